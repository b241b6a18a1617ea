//! Identity: enrollment tickets, certificates with attributes, policies, revocation — with a
//! real relay running the authority, and outlets/inlets enrolled from tickets.

use postern_inlet::{Inlet, InletOptions, InletService, ServiceKind};
use postern_net::control::enroll::{enroll, EnrollError, NodeState};
use postern_net::transport::relay_path::RelayTarget;
use postern_outlet::serve::Services;
use postern_outlet::target::Target;
use postern_outlet::{Outlet, OutletOptions};
use postern_proto::policy::Expr;
use postern_proto::ticket::Ticket;
use postern_proto::tls::{self, Identity};
use postern_relay::authority::{Authority, TicketSpec};
use postern_relay::policy::{PolicyFile, PolicySet};
use postern_relay::state::StateDir;
use postern_relay::{Relay, RelayHandle, RelayOptions};
use postern_tests::kit::*;
use postern_tests::traffic::{echo_once, echo_server};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

struct Project {
    _dir: tempfile::TempDir,
    state: StateDir,
    authority: Arc<Authority>,
}

fn project() -> Project {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = StateDir::new(dir.path().join("relay"));
    state
        .init_ca("test", &node("relay"), false)
        .expect("ca init");
    Project {
        authority: Arc::new(Authority::new(state.clone())),
        _dir: dir,
        state,
    }
}

fn policy(register: &str, route: &str) -> PolicySet {
    PolicySet::from_config(&[PolicyFile {
        service: "echo".into(),
        register: Some(register.into()),
        route: Some(route.into()),
    }])
    .expect("policy")
}

fn start_project_relay(p: &Project, policy: PolicySet) -> (SocketAddr, RelayHandle, Running) {
    let read = |path: &Path| std::fs::read_to_string(path).expect("read");
    let ca = read(&p.state.ca_cert());
    let chain = format!("{}\n{}", read(&p.state.relay_cert()).trim_end(), ca);
    let relay = Relay::bind(RelayOptions {
        listen: "127.0.0.1:0".parse().expect("addr"),
        identity: Identity::from_pem(&chain, &read(&p.state.relay_key())).expect("identity"),
        roots: tls::roots_from_pem(&ca).expect("roots"),
        reset_key: Some([1; 32]),
        tap: None,
        policy,
        authority: Some(p.authority.clone()),
        forward_threads: postern_relay::forward::udp::default_forward_threads(),
    })
    .expect("bind relay");
    let addr = relay.local_addr().expect("addr");
    let handle = relay.handle();
    let running = Running::spawn(|s| relay.run(s));
    (addr, handle, running)
}

fn ticket(p: &Project, relay: SocketAddr, attrs: &[(&str, &str)], ttl: Duration) -> Ticket {
    p.authority
        .create_ticket(TicketSpec {
            attrs: attrs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ttl,
            uses: 1,
            name: None,
            relays: vec![relay.to_string()],
            authority: None,
            relay_name: "relay".into(),
        })
        .expect("ticket")
}

fn enrolled_identity(dir: &Path) -> (Identity, Arc<rustls::RootCertStore>) {
    let s = NodeState::new(dir);
    let read = |p: std::path::PathBuf| std::fs::read_to_string(p).expect("read state");
    (
        Identity::from_pem(&read(s.cert()), &read(s.key())).expect("identity"),
        tls::roots_from_pem(&read(s.ca())).expect("roots"),
    )
}

async fn outlet_from(
    dir: &Path,
    relay: SocketAddr,
    echo: SocketAddr,
    allow: Option<&str>,
) -> (postern_outlet::OutletHandle, Running) {
    let (identity, roots) = enrolled_identity(dir);
    let mut services = Services::default();
    services
        .targets
        .insert(svc("echo"), Target::tcp(echo.to_string()));
    if let Some(a) = allow {
        services
            .allow
            .insert(svc("echo"), Expr::parse(a).expect("allow"));
    }
    let outlet = Outlet::bind(OutletOptions {
        relay: RelayTarget {
            addr: relay,
            name: "relay".into(),
        },
        identity,
        roots,
        services,
    })
    .expect("bind outlet");
    let mut handle = outlet.handle();
    let running = Running::spawn(|s| outlet.run(s));
    assert!(
        handle.wait_registered(Duration::from_secs(10)).await,
        "outlet registered"
    );
    (handle, running)
}

async fn inlet_from(
    dir: &Path,
    relay: SocketAddr,
) -> (SocketAddr, postern_inlet::InletHandle, Running) {
    let (identity, roots) = enrolled_identity(dir);
    let inlet = Inlet::bind(InletOptions {
        relay: RelayTarget {
            addr: relay,
            name: "relay".into(),
        },
        identity,
        roots,
        services: vec![InletService {
            name: svc("echo"),
            listen: "127.0.0.1:0".parse().expect("addr"),
            kind: ServiceKind::Tcp,
        }],
    })
    .await
    .expect("bind inlet");
    let addr = inlet.listen_addr(&svc("echo")).expect("listener");
    let handle = inlet.handle();
    let running = Running::spawn(|s| inlet.run(s));
    (addr, handle, running)
}

async fn echo_eventually(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while echo_once(addr, b"hello").await.as_deref() != Some(b"hello") {
        assert!(Instant::now() < deadline, "no echo through the tunnel");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

const OUTLET_ROLE: &str = r#"role = "outlet""#;
const CLIENT_ROLE: &str = r#"role = "client""#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrolled_nodes_carry_traffic_and_survive_restarts() {
    init_logging();
    let p = project();
    let (relay, handle, _r) = start_project_relay(&p, policy(OUTLET_ROLE, CLIENT_ROLE));
    let (echo, _e) = echo_server().await;
    let dirs = tempfile::tempdir().expect("tempdir");
    let (odir, idir) = (dirs.path().join("outlet"), dirs.path().join("inlet"));
    let t_out = ticket(&p, relay, &[("role", "outlet")], Duration::from_secs(600));
    let t_in = ticket(&p, relay, &[("role", "client")], Duration::from_secs(600));
    // Tickets travel as strings.
    let t_out = Ticket::decode(&t_out.encode()).expect("decode");
    let info = enroll(&t_out, &node("outlet-a"), &NodeState::new(&odir))
        .await
        .expect("enroll outlet");
    assert_eq!(info.attrs.get("role").map(String::as_str), Some("outlet"));
    enroll(&t_in, &node("inlet-a"), &NodeState::new(&idir))
        .await
        .expect("enroll inlet");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(NodeState::new(&idir).key())
            .expect("key")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "private key is 0600");
    }

    let (_oh, o) = outlet_from(&odir, relay, echo, Some(CLIENT_ROLE)).await;
    let (addr, _ih, i) = inlet_from(&idir, relay).await;
    echo_eventually(addr).await;
    let ids = p.authority.identities();
    assert_eq!(ids.len(), 2, "{ids:?}");

    // Restart both from their state directories: no ticket needed.
    i.stop().await;
    o.stop().await;
    let (_oh, _o) = outlet_from(&odir, relay, echo, Some(CLIENT_ROLE)).await;
    let (addr, _ih, _i) = inlet_from(&idir, relay).await;
    echo_eventually(addr).await;
    assert_eq!(handle.nodes(), vec![node("inlet-a"), node("outlet-a")]);

    // The tickets are spent.
    let again = enroll(
        &t_in,
        &node("inlet-b"),
        &NodeState::new(dirs.path().join("x")),
    )
    .await;
    match again {
        Err(e @ EnrollError::Refused { .. }) => {
            assert!(e.to_string().contains("already used"), "{e}");
            assert!(e.is_permanent(), "a spent ticket is not tried again");
        }
        other => panic!("a used ticket must be refused: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tickets_are_refused_with_clear_messages() {
    init_logging();
    let p = project();
    let (relay, _h, _r) = start_project_relay(&p, policy(OUTLET_ROLE, CLIENT_ROLE));
    let dir = tempfile::tempdir().expect("tempdir");
    let state = NodeState::new(dir.path());
    let name = node("n1");

    // Expired: the node notices by itself...
    let t = ticket(&p, relay, &[("role", "client")], Duration::ZERO);
    let err = enroll(&t, &name, &state).await.expect_err("expired");
    assert!(err.to_string().contains("expired"), "{err}");
    // ...and the authority refuses one whose expiry was pushed forward in the text.
    let mut forged = t.clone();
    forged.expires_at_ms += 3_600_000;
    let err = enroll(&forged, &name, &state)
        .await
        .expect_err("expired at the authority");
    assert!(err.to_string().contains("expired"), "{err}");

    // Wrong CA fingerprint: the relay is not trusted, nothing is sent.
    let mut t = ticket(&p, relay, &[("role", "client")], Duration::from_secs(60));
    t.ca_fingerprint = "00".repeat(32);
    let err = enroll(&t, &name, &state).await.expect_err("fingerprint");
    assert!(err.to_string().contains("fingerprint"), "{err}");

    // Tampered secret and tampered attributes.
    let good = ticket(&p, relay, &[("role", "client")], Duration::from_secs(60));
    let mut t = good.clone();
    t.secret = "ab".repeat(24);
    let err = enroll(&t, &name, &state).await.expect_err("secret");
    assert!(err.to_string().contains("altered"), "{err}");
    let mut t = good.clone();
    t.attrs.insert("role".into(), "admin".into());
    let err = enroll(&t, &name, &state).await.expect_err("attrs");
    assert!(err.to_string().contains("altered"), "{err}");
    // Damaged strings do not even decode.
    let text = good.encode();
    assert!(Ticket::decode(&text[..text.len() - 7]).is_err());
    assert!(Ticket::decode("postern-ticket-1.%%%").is_err());
    // The untampered ticket still works after all that.
    enroll(&good, &name, &state).await.expect("good ticket");
    assert!(!state.dir().join("x").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_from_another_ca_are_refused_by_relay_and_outlet() {
    init_logging();
    let p = project();
    let (echo, _e) = echo_server().await;
    let (relay, handle, _r) = start_project_relay(&p, PolicySet::allow_all());
    let dirs = tempfile::tempdir().expect("tempdir");
    let odir = dirs.path().join("outlet");
    let t = ticket(&p, relay, &[("role", "outlet")], Duration::from_secs(60));
    enroll(&t, &node("outlet-a"), &NodeState::new(&odir))
        .await
        .expect("enroll");
    let (_oh, _o) = outlet_from(&odir, relay, echo, None).await;

    // An inlet whose certificate comes from a foreign CA: the relay refuses its handshake.
    let foreign = Pki::new();
    let (_, project_roots) = enrolled_identity(&odir);
    let before = handle
        .control_stats()
        .handshake_failures
        .load(std::sync::atomic::Ordering::Relaxed);
    let inlet = Inlet::bind(InletOptions {
        relay: RelayTarget {
            addr: relay,
            name: "relay".into(),
        },
        identity: foreign.identity("intruder"),
        roots: project_roots.clone(),
        services: vec![InletService {
            name: svc("echo"),
            listen: "127.0.0.1:0".parse().expect("addr"),
            kind: ServiceKind::Tcp,
        }],
    })
    .await
    .expect("bind");
    let addr = inlet.listen_addr(&svc("echo")).expect("addr");
    let shutdown = CancellationToken::new();
    let _t = tokio::spawn(inlet.run(shutdown.clone()));
    let deadline = Instant::now() + Duration::from_secs(10);
    while handle
        .control_stats()
        .handshake_failures
        .load(std::sync::atomic::Ordering::Relaxed)
        == before
    {
        assert!(
            Instant::now() < deadline,
            "relay did not refuse the foreign certificate"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        echo_once(addr, b"hi").await,
        None,
        "no service for a foreign identity"
    );
    assert!(!handle.nodes().contains(&node("intruder")));
    shutdown.cancel();

    // The outlet's end-to-end listener checks the CA too: a connection presenting a foreign
    // certificate on a route the outlet expects is refused during the handshake.
    let cfg =
        postern_net::transport::endpoint::e2e_client(&foreign.identity("inlet-x"), project_roots)
            .expect("client config");
    let ep = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("endpoint");
    // The outlet only listens through the relay, so its trust is checked on the very server
    // config it uses (`e2e_server` with the project CA), driven directly.
    let server = postern_net::transport::endpoint::e2e_server(
        &Pki::new().identity("outlet-y"),
        tls::roots_from_pem(&std::fs::read_to_string(p.state.ca_cert()).expect("ca"))
            .expect("roots"),
    )
    .expect("server config");
    let outlet_ep =
        quinn::Endpoint::server(server, "127.0.0.1:0".parse().expect("addr")).expect("server");
    let target = outlet_ep.local_addr().expect("addr");
    let accept = tokio::spawn(async move {
        match outlet_ep.accept().await {
            Some(inc) => inc.await.is_err(),
            None => false,
        }
    });
    let res = ep
        .connect_with(cfg, target, "outlet-y")
        .expect("connect")
        .await;
    assert!(
        res.is_err(),
        "a foreign client certificate must not complete the handshake"
    );
    assert!(
        accept.await.expect("accept task"),
        "the outlet side refused it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attributes_decide_who_reaches_the_service() {
    init_logging();
    let p = project();
    let (echo, _e) = echo_server().await;
    let dirs = tempfile::tempdir().expect("tempdir");
    let (odir, gdir) = (dirs.path().join("outlet"), dirs.path().join("guest"));

    // Relay policy: only role=client may route. A guest is refused by the relay.
    let (relay, handle, r) = start_project_relay(&p, policy(OUTLET_ROLE, CLIENT_ROLE));
    let t = ticket(&p, relay, &[("role", "outlet")], Duration::from_secs(60));
    enroll(&t, &node("outlet-a"), &NodeState::new(&odir))
        .await
        .expect("enroll");
    let t = ticket(&p, relay, &[("role", "guest")], Duration::from_secs(60));
    enroll(&t, &node("guest-1"), &NodeState::new(&gdir))
        .await
        .expect("enroll");
    let (_oh, o) = outlet_from(&odir, relay, echo, Some(CLIENT_ROLE)).await;
    let (addr, mut ih, i) = inlet_from(&gdir, relay).await;
    assert!(ih.wait_connected(Duration::from_secs(10)).await);
    assert_eq!(
        echo_once(addr, b"hi").await,
        None,
        "relay policy refuses the guest"
    );
    assert!(
        handle
            .control_stats()
            .routes_refused
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );
    i.stop().await;
    o.stop().await;
    r.stop().await;

    // Relay opened up: the outlet's own `allow` still refuses the guest.
    let (relay, handle, _r) = start_project_relay(&p, PolicySet::allow_all());
    let (_oh, _o) = outlet_from(&odir, relay, echo, Some(CLIENT_ROLE)).await;
    let (addr, mut ih, _i) = inlet_from(&gdir, relay).await;
    assert!(ih.wait_connected(Duration::from_secs(10)).await);
    assert_eq!(
        echo_once(addr, b"hi").await,
        None,
        "outlet allow refuses the guest"
    );
    assert!(
        handle
            .control_stats()
            .routes_granted
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1,
        "the relay did route it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_inlet_is_cut_within_a_second_and_stays_out() {
    init_logging();
    let p = project();
    let (echo, _e) = echo_server().await;
    let (relay, handle, _r) = start_project_relay(&p, policy(OUTLET_ROLE, CLIENT_ROLE));
    let dirs = tempfile::tempdir().expect("tempdir");
    let (odir, idir) = (dirs.path().join("outlet"), dirs.path().join("inlet"));
    let t = ticket(&p, relay, &[("role", "outlet")], Duration::from_secs(60));
    enroll(&t, &node("outlet-a"), &NodeState::new(&odir))
        .await
        .expect("enroll");
    let t = ticket(&p, relay, &[("role", "client")], Duration::from_secs(60));
    enroll(&t, &node("inlet-r"), &NodeState::new(&idir))
        .await
        .expect("enroll");
    let (_oh, _o) = outlet_from(&odir, relay, echo, Some(CLIENT_ROLE)).await;
    let (addr, _ih, _i) = inlet_from(&idir, relay).await;
    echo_eventually(addr).await;

    // An open client connection, mid-conversation.
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(b"ping").await.expect("write");
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).await.expect("echo");

    let revoked_at = Instant::now();
    p.authority.revoke(&node("inlet-r")).expect("revoke");
    let mut rest = [0u8; 16];
    let r = tokio::time::timeout(Duration::from_secs(3), s.read(&mut rest)).await;
    assert!(
        matches!(r, Ok(Ok(0)) | Ok(Err(_))),
        "open connection cut: {r:?}"
    );
    let took = revoked_at.elapsed();
    assert!(took < Duration::from_secs(1), "cut after {took:?}");

    // It cannot come back: its reconnection attempts are refused at the handshake.
    let refused = |h: &RelayHandle| {
        h.control_stats()
            .handshake_failures
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while refused(&handle) == 0 {
        assert!(
            Instant::now() < deadline,
            "the revoked inlet never tried to come back"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(echo_once(addr, b"again").await, None);
    assert!(!handle.nodes().contains(&node("inlet-r")));
    let listed: HashMap<String, bool> = p
        .authority
        .identities()
        .into_iter()
        .map(|i| (i.name.to_string(), i.revoked))
        .collect();
    assert_eq!(listed.get("inlet-r"), Some(&true));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_are_renewed_over_the_control_connection() {
    init_logging();
    let p = project();
    let (echo, _e) = echo_server().await;
    let (relay, _h, _r) = start_project_relay(&p, policy(OUTLET_ROLE, CLIENT_ROLE));
    let dirs = tempfile::tempdir().expect("tempdir");
    let (odir, idir) = (dirs.path().join("outlet"), dirs.path().join("inlet"));
    let t = ticket(&p, relay, &[("role", "outlet")], Duration::from_secs(60));
    enroll(&t, &node("outlet-a"), &NodeState::new(&odir))
        .await
        .expect("enroll");
    let t = ticket(&p, relay, &[("role", "client")], Duration::from_secs(60));
    enroll(&t, &node("inlet-n"), &NodeState::new(&idir))
        .await
        .expect("enroll");
    let (_oh, _o) = outlet_from(&odir, relay, echo, Some(CLIENT_ROLE)).await;
    let (addr, ih, i) = inlet_from(&idir, relay).await;
    echo_eventually(addr).await;

    let state = NodeState::new(&idir);
    let old_cert = std::fs::read_to_string(state.cert()).expect("cert");
    let old_key = std::fs::read_to_string(state.key()).expect("key");
    let mut control = ih.control();
    let conn =
        postern_net::control::connection::wait_connected(&mut control, Duration::from_secs(10))
            .await
            .expect("control connection");
    let identity = postern_net::control::renew::renew_once(&conn, &state)
        .await
        .expect("renew");
    ih.set_identity(&identity).expect("use renewed identity");
    let new_cert = std::fs::read_to_string(state.cert()).expect("cert");
    assert_ne!(new_cert, old_cert, "a new certificate");
    assert_ne!(
        std::fs::read_to_string(state.key()).expect("key"),
        old_key,
        "with a new key"
    );
    let der = postern_proto::pki::first_cert(&new_cert).expect("der");
    assert_eq!(
        postern_proto::pki::cert_name(&der).expect("name"),
        node("inlet-n")
    );
    assert_eq!(
        postern_proto::pki::cert_attributes(&der)
            .expect("attrs")
            .get("role")
            .map(String::as_str),
        Some("client"),
        "same attributes"
    );

    // A restart uses the renewed pair.
    i.stop().await;
    let (addr, ih, _i) = inlet_from(&idir, relay).await;
    echo_eventually(addr).await;

    // A revoked identity cannot renew.
    let mut control = ih.control();
    let conn =
        postern_net::control::connection::wait_connected(&mut control, Duration::from_secs(10))
            .await
            .expect("control connection");
    p.authority.revoke(&node("inlet-n")).expect("revoke");
    let err = postern_net::control::renew::renew_once(&conn, &state)
        .await
        .expect_err("revoked");
    assert!(
        err.to_string().contains("revoked") || err.to_string().contains("connection"),
        "{err}"
    );
}
