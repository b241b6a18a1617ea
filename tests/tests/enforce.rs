//! The outlet enforces leased credentials (issue 12): an enrolled client gets nothing but its own
//! lease's rights, whatever it runs on its side. Real relay, outlet and inlets in this process,
//! a real influxd 1.x with authentication behind the outlet.
//!
//! The attacker is an enrolled inlet (`mallory`, same role as the honest `alice`) that declares
//! the service as plain TCP, so no filter runs on its side: every byte it sends reaches the
//! outlet as sent. It knows the InfluxDB admin's password and has stolen alice's lease.

use postern_inlet::ServiceKind;
use postern_outlet::lease::{Api, InfluxdbOutletConfig, InjectAt, LeaseManager, SecretRef};
use postern_outlet::serve::Services;
use postern_outlet::target::Target;
use postern_proto::lease::Credential;
use postern_tests::influxd::{Influxd, InfluxdOptions};
use postern_tests::kit::*;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

/// Longest wait for anything in these tests.
const WAIT: Duration = Duration::from_secs(20);
const DB: &str = "leased";

struct Lab {
    influxd: Influxd,
    manager: Arc<LeaseManager>,
    _pki: Pki,
    _relay: RelayNode,
    outlet: OutletNode,
    alice: InletNode,
    mallory: InletNode,
    _state: tempfile::TempDir,
}

impl Lab {
    async fn start(inject_at: InjectAt) -> Lab {
        Lab::start_with(inject_at, false).await
    }

    /// With `hand_out`, a client may have its own credential handed out to it.
    async fn start_with(inject_at: InjectAt, hand_out: bool) -> Lab {
        init_logging();
        let influxd = Influxd::start(InfluxdOptions { auth: true })
            .await
            .expect("start influxd");
        influxd
            .query(&format!("CREATE DATABASE {DB}"))
            .await
            .expect("create db");
        let state = tempfile::tempdir().expect("tempdir");
        let admin = state.path().join("admin");
        std::fs::write(
            &admin,
            format!("{}:{}", influxd.admin_user(), influxd.admin_password()),
        )
        .expect("write admin secret");
        let cfg = InfluxdbOutletConfig {
            to: influxd.url(),
            tls: false,
            tls_ca: None,
            allow: None,
            org_id: None,
            all_access_token: SecretRef::new(format!("file:{}", admin.display())),
            leased_token_expires_in: 60,
            leased_token_permissions: format!(
                r#"[{{"action":"read","resource":{{"type":"buckets","name":"{DB}"}}}},
                   {{"action":"write","resource":{{"type":"buckets","name":"{DB}"}}}}]"#
            ),
            api: Api::V1,
            inject_at,
            hand_out,
            profile: Vec::new(),
        }
        .validate()
        .expect("valid lease config");
        let manager = LeaseManager::start(cfg, state.path(), CancellationToken::new())
            .await
            .expect("start lease manager");
        let mut services = Services::default();
        services.targets.insert(
            svc("influxdb"),
            Target::tcp(influxd.http_addr().to_string()),
        );
        services.leases.insert(svc("influxdb"), manager.clone());
        services.inject_at.insert(svc("influxdb"), inject_at);
        let pki = Pki::new();
        let relay = start_relay(
            &pki,
            "127.0.0.1:0".parse().expect("addr"),
            rand::random(),
            None,
        );
        let outlet = start_outlet_with(&pki, "outlet-1", relay.addr, services).await;
        let alice = start_inlet_kinds(
            &pki,
            "alice",
            relay.addr,
            &[("influxdb", ServiceKind::Influxdb)],
        )
        .await;
        let mallory = start_inlet_kinds(
            &pki,
            "mallory",
            relay.addr,
            &[("influxdb", ServiceKind::Tcp)],
        )
        .await;
        Lab {
            influxd,
            manager,
            _pki: pki,
            _relay: relay,
            outlet,
            alice,
            mallory,
            _state: state,
        }
    }

    fn admin_basic(&self) -> String {
        Credential::Basic {
            username: self.influxd.admin_user().to_owned(),
            password: self.influxd.admin_password().to_owned(),
        }
        .authorization()
    }

    /// Alice's current lease, once she has one (her inlet asks for it when it connects).
    async fn alice_lease(&self) -> Credential {
        let mut rx = self.manager.subscribe(&node("alice")).expect("subscribe");
        let grant = tokio::time::timeout(WAIT, rx.wait_for(Option::is_some))
            .await
            .expect("alice's lease in time")
            .expect("lease manager running")
            .clone();
        grant.expect("a grant").credential
    }

    /// Whether database `name` exists (asked as the admin, straight to influxd).
    async fn has_db(&self, name: &str) -> bool {
        let v = self.influxd.query("SHOW DATABASES").await.expect("show");
        v.pointer("/results/0/series/0/values")
            .and_then(|v| v.as_array())
            .is_some_and(|rows| {
                rows.iter()
                    .any(|r| r.get(0).and_then(|n| n.as_str()) == Some(name))
            })
    }

    async fn stop(self) {
        self.alice.running.stop().await;
        self.mallory.running.stop().await;
        self.outlet.running.stop().await;
    }
}

/// Sends `bytes` on a fresh connection and reads until the other side closes. Returns the
/// status codes of the responses, in order, and the whole text.
async fn exchange(addr: SocketAddr, bytes: &[u8]) -> (Vec<u16>, String) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(bytes).await.expect("send");
    let mut out = Vec::new();
    let read = tokio::time::timeout(WAIT, s.read_to_end(&mut out)).await;
    assert!(read.is_ok(), "no end of the connection within {WAIT:?}");
    let text = String::from_utf8_lossy(&out).into_owned();
    let statuses = text
        .match_indices("HTTP/1.1 ")
        .filter_map(|(i, _)| text.get(i + 9..i + 12)?.parse().ok())
        .collect();
    (statuses, text)
}

fn query(q: &str, extra: &str) -> String {
    let body = format!("q={}", q.replace(' ', "+"));
    format!(
        "POST /query HTTP/1.1\r\nHost: influxdb\r\n{extra}Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

fn write_point(extra: &str, line: &str) -> String {
    format!(
        "POST /write?db={DB} HTTP/1.1\r\nHost: influxdb\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n{line}",
        line.len()
    )
}

/// A request that makes InfluxDB run `CREATE DATABASE` (admin only) with query credentials.
fn create_db_with_query_creds(lab: &Lab, db: &str) -> String {
    let q = format!(
        "/query?u={}&p={}&q=CREATE+DATABASE+{db}",
        lab.influxd.admin_user(),
        lab.influxd.admin_password()
    );
    format!("POST {q} HTTP/1.1\r\nHost: influxdb\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
}

/// `Upgrade: h2c` and `CONNECT` turned the inlet's filter off, and a request pipelined behind
/// them reached influxd with the admin's password. Now both are refused (501) at the inlet, and
/// at the outlet for a client whose side runs no filter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_behind_h2c_and_connect_never_run() {
    let lab = Lab::start(InjectAt::Inlet).await;
    let admin = lab.admin_basic();
    let openers = [
        "GET / HTTP/1.1\r\nHost: influxdb\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n".to_owned(),
        "CONNECT influxdb:8086 HTTP/1.1\r\nHost: influxdb:8086\r\n\r\n".to_owned(),
        // The classic: announce a WebSocket the server will not switch to.
        "GET /ping HTTP/1.1\r\nHost: influxdb\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n".to_owned(),
    ];
    for (via, addr) in [
        ("alice", lab.alice.addr("influxdb")),
        ("mallory", lab.mallory.addr("influxdb")),
    ] {
        for (i, opener) in openers.iter().enumerate() {
            let db = format!("evil_{via}_{i}");
            let mut input = opener.clone().into_bytes();
            input.extend_from_slice(create_db_with_query_creds(&lab, &db).as_bytes());
            let (statuses, text) = exchange(addr, &input).await;
            assert!(
                !lab.has_db(&db).await,
                "{via}/{i}: pipelined request ran: {text}"
            );
            let db = format!("evil_{via}_{i}_auth");
            let mut input = opener.clone().into_bytes();
            input.extend_from_slice(
                query(
                    &format!("CREATE DATABASE {db}"),
                    &format!("Authorization: {admin}\r\n"),
                )
                .as_bytes(),
            );
            let (statuses2, text2) = exchange(addr, &input).await;
            assert!(
                !lab.has_db(&db).await,
                "{via}/{i}: pipelined request ran: {text2}"
            );
            if i < 2 {
                assert_eq!(statuses.first(), Some(&501), "{via}/{i}: {text}");
                assert_eq!(statuses2.first(), Some(&501), "{via}/{i}: {text2}");
            }
        }
    }
    lab.stop().await;
}

/// An enrolled client with a plain-TCP inlet tries other credentials: the admin's (header and
/// query), alice's stolen lease, none at all. With `inject-at = "inlet"` every one gets a 403
/// from the outlet and nothing reaches InfluxDB; alice's own requests work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_tcp_client_gets_nothing_but_its_own_lease_inject_at_inlet() {
    let lab = Lab::start(InjectAt::Inlet).await;
    let alice_lease = lab.alice_lease().await.authorization();
    let users_before = lab.influxd.users().await.expect("users");
    let mallory = lab.mallory.addr("influxdb");
    let attempts = [
        (
            "admin header",
            query(
                "CREATE DATABASE evil1",
                &format!("Authorization: {}\r\n", lab.admin_basic()),
            ),
            "evil1",
        ),
        (
            "admin query",
            create_db_with_query_creds(&lab, "evil2"),
            "evil2",
        ),
        (
            "stolen lease",
            query(
                "CREATE DATABASE evil3",
                &format!("Authorization: {alice_lease}\r\n"),
            ),
            "evil3",
        ),
        ("none", query("CREATE DATABASE evil4", ""), "evil4"),
        (
            "two",
            query(
                "CREATE DATABASE evil5",
                &format!(
                    "Authorization: {alice_lease}\r\nAuthorization: {}\r\n",
                    lab.admin_basic()
                ),
            ),
            "evil5",
        ),
    ];
    for (name, req, db) in &attempts {
        let (statuses, text) = exchange(mallory, req.as_bytes()).await;
        assert_eq!(statuses, vec![403], "{name}: {text}");
        assert!(text.contains("postern outlet"), "{name}: {text}");
        assert!(
            !text.contains(lab.influxd.admin_password()),
            "{name}: secret echoed"
        );
        assert!(!lab.has_db(db).await, "{name}: ran on InfluxDB");
    }
    // Writing with alice's stolen lease is refused as well: nothing lands in the database.
    let (statuses, _) = exchange(
        mallory,
        write_point(
            &format!("Authorization: {alice_lease}\r\n"),
            "m,who=mallory v=1",
        )
        .as_bytes(),
    )
    .await;
    assert_eq!(statuses, vec![403]);
    // Alice, through her own inlet, writes and reads with her lease.
    let alice = lab.alice.addr("influxdb");
    let (statuses, text) = exchange(alice, write_point("", "m,who=alice v=1").as_bytes()).await;
    assert_eq!(statuses, vec![204], "{text}");
    let (statuses, text) = exchange(alice, query("SELECT * FROM leased..m", "").as_bytes()).await;
    assert_eq!(statuses, vec![200], "{text}");
    assert!(
        text.contains("alice") && !text.contains("mallory"),
        "{text}"
    );
    // The outlet made no user for the attacker's attempts: only alice's lease (and mallory's,
    // which her inlet asks for when it connects) exist besides the admin.
    let users_after = lab.influxd.users().await.expect("users");
    assert!(
        users_after.len() <= users_before.len() + 1,
        "{users_before:?} -> {users_after:?}"
    );
    lab.stop().await;
}

/// With `inject-at = "outlet"` the credential never leaves the private network: alice's inlet
/// is told so and sends none, and whatever mallory sends is replaced by mallory's own lease,
/// which may only read and write the leased database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_tcp_client_gets_nothing_but_its_own_lease_inject_at_outlet() {
    let lab = Lab::start(InjectAt::Outlet).await;
    let mallory = lab.mallory.addr("influxdb");
    let alice = lab.alice.addr("influxdb");
    // Alice works with no credential anywhere on her side.
    let deadline = Instant::now() + WAIT;
    loop {
        let (statuses, text) = exchange(alice, write_point("", "m,who=alice v=1").as_bytes()).await;
        if statuses == vec![204] {
            break;
        }
        assert!(Instant::now() < deadline, "alice never served: {text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let alice_lease = lab.alice_lease().await.authorization();
    let attempts = [
        (
            "admin header",
            query(
                "CREATE DATABASE evil1",
                &format!("Authorization: {}\r\n", lab.admin_basic()),
            ),
            "evil1",
        ),
        (
            "admin query",
            create_db_with_query_creds(&lab, "evil2"),
            "evil2",
        ),
        (
            "stolen lease",
            query(
                "CREATE DATABASE evil3",
                &format!("Authorization: {alice_lease}\r\n"),
            ),
            "evil3",
        ),
    ];
    for (name, req, db) in &attempts {
        let (statuses, text) = exchange(mallory, req.as_bytes()).await;
        // InfluxDB answers, but as mallory's lease user, who may not create databases.
        assert_eq!(statuses, vec![403], "{name}: {text}");
        assert!(
            !lab.has_db(db).await,
            "{name}: ran with more than mallory's lease"
        );
    }
    // Mallory's own lease works for what it allows, and is written as mallory's user.
    let (statuses, text) = exchange(
        mallory,
        write_point(
            &format!("Authorization: {}\r\n", lab.admin_basic()),
            "m,who=mallory v=2",
        )
        .as_bytes(),
    )
    .await;
    assert_eq!(statuses, vec![204], "{text}");
    let (statuses, text) = exchange(alice, query("SELECT * FROM leased..m", "").as_bytes()).await;
    assert_eq!(statuses, vec![200], "{text}");
    assert!(text.contains("alice") && text.contains("mallory"), "{text}");
    lab.stop().await;
}

/// With `inject-at = "outlet"` a credential handed out to the client itself (`postern-inlet
/// lease create`, asked for here through mallory's running inlet) is its own lease: presented
/// on mallory's plain TCP service, it reaches InfluxDB as presented instead of being swapped
/// for the streamed lease. Dropping its user behind the outlet's back shows which one reached
/// InfluxDB. Without `hand-out = true` the outlet refuses to hand it out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handed_out_lease_is_accepted_as_presented_inject_at_outlet() {
    let refused = Lab::start(InjectAt::Outlet).await;
    let err = refused
        .mallory
        .handle
        .hand_out(Some(&svc("influxdb")), true)
        .await
        .expect_err("hand-out is off by default");
    assert!(err.contains("does not hand credentials out"), "{err}");
    refused.stop().await;

    let lab = Lab::start_with(InjectAt::Outlet, true).await;
    let mallory = lab.mallory.addr("influxdb");
    let (service, profile, grant) = lab
        .mallory
        .handle
        .hand_out(None, true)
        .await
        .expect("hand-out through mallory's inlet");
    assert_eq!((service, profile.as_str()), (svc("influxdb"), "default"));
    let presented = format!("Authorization: {}\r\n", grant.credential.authorization());
    let (statuses, text) = exchange(
        mallory,
        write_point(&presented, "m,who=handed v=1").as_bytes(),
    )
    .await;
    assert_eq!(statuses, vec![204], "{text}");
    // Drop the handed-out user in InfluxDB only: the outlet still holds its lease as live.
    let Credential::Basic { username, .. } = &grant.credential else {
        panic!("v1 leases are users");
    };
    lab.influxd
        .query(&format!("DROP USER \"{username}\""))
        .await
        .expect("drop user");
    let (statuses, text) = exchange(
        mallory,
        write_point(&presented, "m,who=handed v=2").as_bytes(),
    )
    .await;
    assert_eq!(
        statuses,
        vec![401],
        "the handed-out credential was swapped: {text}"
    );
    // Without a credential of its own, mallory's streamed lease is put in as before.
    let (statuses, text) = exchange(mallory, write_point("", "m,who=mallory v=3").as_bytes()).await;
    assert_eq!(statuses, vec![204], "{text}");
    lab.stop().await;
}

/// A client trickling a request head (slowloris) is answered 408 and cut off within the head
/// timeout, at the inlet and at the outlet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_is_cut_off() {
    let lab = Lab::start(InjectAt::Inlet).await;
    let limit = postern_net::stream::http_proxy::HEAD_TIMEOUT;
    for addr in [lab.alice.addr("influxdb"), lab.mallory.addr("influxdb")] {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        let started = Instant::now();
        let (mut r, mut w) = s.split();
        let trickle = async {
            for b in b"GET /ping HTTP/1.1\r\nHost: influxdb\r\nX-Slow: "
                .iter()
                .chain([b'a'; 200].iter())
            {
                if w.write_all(&[*b]).await.is_err() {
                    return;
                }
                // The slowness is the attack tested: one byte every half second.
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        };
        let mut out = Vec::new();
        let read = async {
            let _ = r.read_to_end(&mut out).await;
            started.elapsed()
        };
        let took = tokio::select! {
            t = read => t,
            () = trickle => panic!("the trickle was never cut off"),
        };
        let text = String::from_utf8_lossy(&out);
        assert!(text.starts_with("HTTP/1.1 408 "), "{text}");
        assert!(
            took >= limit && took < limit + Duration::from_secs(8),
            "{took:?}"
        );
    }
    lab.stop().await;
}

/// A request at the inlet filter's limits (128 fields) still passes the outlet's filter after
/// the inlet added the lease's field (found by fuzzing: the same limits on both sides refused it
/// at the outlet).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_at_the_limits_passes_both_filters() {
    let lab = Lab::start(InjectAt::Inlet).await;
    let max = postern_proto::http::DEFAULT_MAX_HEADERS;
    // Host, Content-Length and Connection are three of the fields.
    let extra: String = (0..max - 3)
        .map(|i| format!("X-Pad-{i}: {i}\r\n"))
        .collect();
    let alice = lab.alice.addr("influxdb");
    let deadline = Instant::now() + WAIT;
    loop {
        let (statuses, text) =
            exchange(alice, write_point(&extra, "m,who=alice v=3").as_bytes()).await;
        if statuses == vec![204] {
            break;
        }
        assert!(
            statuses == vec![503] && Instant::now() < deadline,
            "refused at the limits: {text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // One field more is refused by the inlet itself.
    let extra = format!("{extra}X-One-More: 1\r\n");
    let (statuses, text) = exchange(alice, write_point(&extra, "m v=4").as_bytes()).await;
    assert_eq!(statuses, vec![400], "{text}");
    assert!(text.contains("postern inlet"), "{text}");
    lab.stop().await;
}
