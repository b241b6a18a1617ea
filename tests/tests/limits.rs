//! Connection caps, file-descriptor exhaustion and revocation, end to end on 127.0.0.1 with a
//! real influxd 1.x (auth on) behind the outlet:
//!
//! - a flood of idle connections beyond the inlet's cap leaves `/ping` answering, and the
//!   refusal metric counts the connections closed;
//! - the real `postern-inlet` binary with a low open-file limit keeps serving through a flood
//!   larger than that limit, and after it;
//! - a revoked identity's InfluxDB user is gone within a second;
//! - a revoked inlet stops retrying in a tight loop and `/readyz` says why.

use postern_inlet::{Inlet, InletOptions, InletService, ServiceKind};
use postern_outlet::lease::{Api, InfluxdbOutletConfig, LeaseConfig, LeaseManager, SecretRef};
use postern_outlet::serve::Services;
use postern_outlet::target::Target;
use postern_tests::influxd::{Influxd, InfluxdOptions};
use postern_tests::kit::*;
use postern_tests::ports::free_port;
use postern_tests::procs::{bin, write_identity, IdentityFiles};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

const PERMS: &str = r#"[{"action":"write","resource":{"type":"databases","name":"telegraf"}}]"#;

fn lease_config(influxd: &Influxd, dir: &Path, ttl_s: u64) -> LeaseConfig {
    let secret = dir.join("influxd-admin");
    std::fs::write(
        &secret,
        format!("{}:{}", influxd.admin_user(), influxd.admin_password()),
    )
    .expect("write secret");
    InfluxdbOutletConfig {
        to: influxd.url(),
        tls: false,
        tls_ca: None,
        allow: None,
        org_id: None,
        all_access_token: SecretRef::new(format!("file:{}", secret.display())),
        leased_token_expires_in: ttl_s,
        leased_token_permissions: PERMS.into(),
        api: Api::V1,
        inject_at: Default::default(),
        hand_out: false,
        profile: Vec::new(),
    }
    .validate()
    .expect("valid v1 lease config")
}

/// influxd with auth, a lease manager for it, a relay and an outlet serving `influxdb`.
struct Backend {
    influxd: Influxd,
    mgr: Arc<LeaseManager>,
    pki: Pki,
    relay: RelayNode,
    _outlet: OutletNode,
    dir: tempfile::TempDir,
}

impl Backend {
    async fn start(ttl_s: u64) -> Backend {
        let influxd = Influxd::start(InfluxdOptions { auth: true })
            .await
            .expect("start influxd");
        influxd
            .query("CREATE DATABASE telegraf")
            .await
            .expect("create db");
        let dir = tempfile::tempdir().expect("tempdir");
        let mgr = LeaseManager::start(
            lease_config(&influxd, dir.path(), ttl_s),
            &dir.path().join("leases"),
            CancellationToken::new(),
        )
        .await
        .expect("lease manager");
        let pki = Pki::new();
        let relay = start_relay(
            &pki,
            "127.0.0.1:0".parse().expect("addr"),
            rand::random(),
            None,
        );
        let mut services = Services::default();
        services.targets.insert(
            svc("influxdb"),
            Target::tcp(influxd.http_addr().to_string()),
        );
        services.leases.insert(svc("influxdb"), mgr.clone());
        let outlet = start_outlet_with(&pki, "outlet-1", relay.addr, services).await;
        Backend {
            influxd,
            mgr,
            pki,
            relay,
            _outlet: outlet,
            dir,
        }
    }

    async fn leased_users(&self) -> Vec<String> {
        self.influxd
            .users()
            .await
            .expect("SHOW USERS")
            .into_iter()
            .filter(|u| u.starts_with("postern_"))
            .collect()
    }
}

/// An in-process inlet with an `influxdb` listener capped at `max` connections.
async fn start_capped_inlet(b: &Backend, name: &str, max: usize) -> (SocketAddr, Running) {
    let mut inlet = Inlet::bind(InletOptions {
        relay: relay_target(b.relay.addr),
        identity: b.pki.identity(name),
        roots: b.pki.roots(),
        services: vec![InletService {
            name: svc("influxdb"),
            listen: "127.0.0.1:0".parse().expect("addr"),
            kind: ServiceKind::Influxdb,
        }],
    })
    .await
    .expect("bind inlet");
    inlet.set_max_connections(max);
    let addr = inlet.listen_addr(&svc("influxdb")).expect("listener");
    let mut handle = inlet.handle();
    handle.set_pool_size(1);
    let running = Running::spawn(|s| inlet.run(s));
    assert!(handle.wait_connected(Duration::from_secs(10)).await);
    (addr, running)
}

/// `GET /ping` on a new connection; the status code, or why there was none.
async fn ping(addr: SocketAddr, limit: Duration) -> Result<u16, String> {
    let exchange = async {
        let mut s = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        s.write_all(b"GET /ping HTTP/1.1\r\nHost: influxdb\r\nConnection: close\r\n\r\n")
            .await
            .map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&out);
        text.get(9..12)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| format!("no status line in {text:?}"))
    };
    tokio::time::timeout(limit, exchange)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {limit:?}")))
}

/// Waits until `/ping` through the inlet answers 204 (the lease has reached the inlet).
async fn ping_eventually(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match ping(addr, Duration::from_secs(5)).await {
            Ok(204) => return,
            other => assert!(Instant::now() < deadline, "no /ping answer: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Opens `n` connections that send nothing; also says how many were reset while connecting
/// (closed by the server at once).
async fn flood(addr: SocketAddr, n: usize) -> (Vec<TcpStream>, usize) {
    let mut open = Vec::with_capacity(n);
    let mut reset = 0;
    for _ in 0..n {
        match TcpStream::connect(addr).await {
            Ok(s) => open.push(s),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => reset += 1,
            Err(e) => panic!("flood connect: {e}"),
        }
    }
    (open, reset)
}

/// How many of `conns` the server has closed (EOF or reset), waiting up to `limit` for each.
async fn closed_by_server(conns: &mut [TcpStream], limit: Duration) -> usize {
    let mut closed = 0;
    let deadline = tokio::time::Instant::now() + limit;
    for c in conns.iter_mut() {
        let mut b = [0u8; 1];
        if let Ok(Ok(0) | Err(_)) = tokio::time::timeout_at(deadline, c.read(&mut b)).await {
            closed += 1;
        }
    }
    closed
}

/// The sum of every sample of `metric` in a Prometheus text exposition.
fn metric_sum(text: &str, metric: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(metric) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_beyond_the_cap_leaves_ping_answering_and_is_counted() {
    init_logging();
    let recorder = postern_net::runtime::ops::recorder().expect("metrics recorder");
    let b = Backend::start(120).await;
    let (addr, _inlet) = start_capped_inlet(&b, "inlet-flood", 50).await;
    ping_eventually(addr).await;

    let (mut idle, reset) = flood(addr, 200).await;
    // A client arriving during the flood is served.
    let started = Instant::now();
    assert_eq!(ping(addr, Duration::from_secs(5)).await, Ok(204));
    assert!(started.elapsed() < Duration::from_secs(5));
    // The flood beyond the cap was closed by the inlet, not held: at most the cap stays open.
    let closed = reset + closed_by_server(&mut idle, Duration::from_secs(2)).await;
    assert!(
        closed >= 150,
        "only {closed} of 200 idle connections closed"
    );
    let text = recorder.render();
    let refused = metric_sum(&text, "postern_inlet_connections_refused_total");
    assert!(
        refused >= 150.0,
        "refusal metric {refused}; exposition:\n{text}"
    );
    // Still answering after the flood too.
    drop(idle);
    assert_eq!(ping(addr, Duration::from_secs(5)).await, Ok(204));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_inlet_binary_keeps_serving_through_fd_exhaustion() {
    init_logging();
    let b = Backend::start(120).await;
    let dir = b.dir.path().join("inlet-bin");
    std::fs::create_dir_all(&dir).expect("dir");
    let IdentityFiles { cert, key, ca } = write_identity(&b.pki, "inlet-fd", &dir);
    let listen = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let metrics = SocketAddr::from(([127, 0, 0, 1], free_port()));
    // 128 descriptors: far fewer than the flood below. No --max-connections: the default
    // must fit under the limit by itself.
    let script = format!(
        "ulimit -n 128 && exec {} run --relay {} --relay-name relay --cert {} --key {} --ca {} \
         --state-dir {} --service influxdb={listen},kind=influxdb --metrics-addr {metrics}",
        bin("postern-inlet").display(),
        b.relay.addr,
        cert.display(),
        key.display(),
        ca.display(),
        dir.join("state").display(),
    );
    let mut child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(&script)
        .kill_on_drop(true)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn postern-inlet");
    let stderr = child.stderr.take().expect("stderr");
    let log = tokio::spawn(async move {
        let mut s = String::new();
        let mut r = tokio::io::BufReader::new(stderr);
        let _ = r.read_to_string(&mut s).await;
        s
    });
    ping_eventually(listen).await;

    let (mut idle, reset) = flood(listen, 400).await;
    assert_eq!(
        ping(listen, Duration::from_secs(5)).await,
        Ok(204),
        "a client during the flood is served"
    );
    let closed = reset + closed_by_server(&mut idle, Duration::from_secs(2)).await;
    assert!(
        closed >= 300,
        "only {closed} of 400 idle connections closed"
    );
    drop(idle);
    assert_eq!(
        ping(listen, Duration::from_secs(5)).await,
        Ok(204),
        "served after the flood"
    );
    let scrape = reqwest::get(format!("http://{metrics}/metrics"))
        .await
        .expect("scrape")
        .text()
        .await
        .expect("body");
    assert!(
        metric_sum(&scrape, "postern_inlet_connections_refused_total") >= 300.0,
        "{scrape}"
    );
    let _ = child.start_kill();
    let _ = child.wait().await;
    let log = log.await.unwrap_or_default();
    assert!(
        !log.contains("Too many open files"),
        "the inlet ran out of descriptors:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_identity_loses_its_influxdb_user_within_a_second() {
    init_logging();
    let b = Backend::start(55).await;
    let inlet = start_inlet_kinds(
        &b.pki,
        "inlet-rev",
        b.relay.addr,
        &[("influxdb", ServiceKind::Influxdb)],
    )
    .await;
    ping_eventually(inlet.addr("influxdb")).await;
    assert_eq!(b.leased_users().await.len(), 1, "one leased user");

    let revoked_at = Instant::now();
    b.relay
        .handle
        .revoke_identity(&node("inlet-rev"))
        .await
        .expect("revoke");
    loop {
        if b.leased_users().await.is_empty() {
            break;
        }
        assert!(
            revoked_at.elapsed() < Duration::from_secs(1),
            "the revoked identity's InfluxDB user is still there after {:?}",
            revoked_at.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = revoked_at.elapsed();
    tracing::info!(?took, "revoked identity's InfluxDB user gone");
    // And it gets no new lease, nor a renewal.
    let e = b
        .mgr
        .create(&node("inlet-rev"))
        .await
        .expect_err("a revoked identity gets no lease");
    assert!(e.to_string().contains("revoked"), "{e}");
    assert!(b.mgr.subscribe(&node("inlet-rev")).is_err());
    let leases = b.mgr.list().await.expect("list");
    assert!(leases.iter().all(|l| l.client != "inlet-rev"), "{leases:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_inlet_stops_retrying_and_says_why() {
    init_logging();
    let pki = Pki::new();
    let relay = start_relay(
        &pki,
        "127.0.0.1:0".parse().expect("addr"),
        rand::random(),
        None,
    );
    let inlet = start_inlet(&pki, "inlet-gone", relay.addr, &["svc"]).await;
    // The inlet sees its control connection up a moment before the relay has filed the node:
    // revoke once the relay knows it.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match relay.handle.revoke_identity(&node("inlet-gone")).await {
            Ok(_) => break,
            Err(e) => assert!(Instant::now() < deadline, "revoke: {e:?}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let failures = || {
        relay
            .handle
            .control_stats()
            .handshake_failures
            .load(Relaxed)
    };
    // The relay closed its connection saying why: /readyz says so, and it backs off.
    let deadline = Instant::now() + Duration::from_secs(5);
    let why = loop {
        match inlet.handle.readiness() {
            Err(why) if why.contains("refuses") => break why,
            other => assert!(Instant::now() < deadline, "readiness: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(why.contains("revoked"), "{why}");
    let before = failures();
    // Letting time pass is the test: the retries made in 4 s are counted.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let tries = failures() - before;
    // Today's loop retried every 50-90 ms: some 50 tries in 4 s, each refused at the relay.
    // Now: 1-2 s, then 2-4 s, doubling to minutes.
    assert!(
        tries <= 2,
        "{tries} attempts in 4 s after a permanent refusal"
    );
    assert!(!inlet.handle.relay_connected());
}
