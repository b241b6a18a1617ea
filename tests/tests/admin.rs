//! The relay's admin API against real nodes: strangers are refused, the views show the nodes,
//! services and routes that really exist (with live traffic), revoking and draining through
//! the API act on real connections, and the real `postern-relay status` prints a running
//! relay's state.
//!
//! The last test runs `postern-relay` next to this test executable (`target/debug`); build it
//! first with `cargo build --bins` (scripts/test.sh does).

use postern_inlet::{Inlet, InletHandle, InletOptions, InletService, ServiceKind};
use postern_net::runtime::clock::now_ms;
use postern_outlet::serve::Services;
use postern_outlet::target::Target;
use postern_outlet::{Outlet, OutletHandle, OutletOptions};
use postern_proto::pki::Ca;
use postern_proto::policy::Attributes;
use postern_proto::tls::{self, Identity};
use postern_relay::admin::client::{AdminClient, ClientError};
use postern_relay::admin::{self, AdminApi, AdminToken, TOKEN_FILE};
use postern_relay::views::{
    Draining, ErrorBody, Identities, Nodes, Revoked, Routes, Services as ServiceList, Tickets,
    Undrained,
};
use postern_relay::RelayHandle;
use postern_tests::kit::*;
use postern_tests::ports::{free_port, free_udp_addr};
use postern_tests::procs::{bin, cli_output};
use postern_tests::traffic::{echo_once, echo_server};
use postern_tests::wait::eventually;
use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::Command;
use tokio_util::sync::CancellationToken;

// ---------------------------------------------------------------------------------------------
// Nodes with known certificates

/// A certificate for `name` with `role`, from `ca`; returns it and its SHA-256 fingerprint.
fn identity(ca: &Ca, name: &str, role: &str) -> (Identity, String) {
    let mut attrs = Attributes::new();
    attrs.insert("role".into(), role.into());
    let issued = ca
        .issue_with(&node(name), &attrs, Duration::from_secs(3600))
        .expect("issue");
    let id = Identity::from_pem(&issued.cert_pem, &issued.key_pem).expect("identity");
    let fp = postern_proto::pki::fingerprint(id.certs[0].as_ref());
    (id, fp)
}

struct Node {
    fingerprint: String,
    _running: Running,
}

/// Starts an outlet named `name` (role `echo-outlet`) serving `service` to `target`, and waits
/// until it has registered.
async fn outlet(ca: &Ca, name: &str, relay: SocketAddr, service: &str, target: SocketAddr) -> Node {
    let (identity, fingerprint) = identity(ca, name, "echo-outlet");
    let outlet = Outlet::bind(OutletOptions {
        relay: relay_target(relay),
        identity,
        roots: tls::roots_from_pem(ca.cert_pem()).expect("roots"),
        services: Services {
            targets: HashMap::from([(svc(service), Target::tcp(target.to_string()))]),
            leases: HashMap::new(),
            allow: HashMap::new(),
            inject_at: HashMap::new(),
            udp: HashMap::new(),
        },
    })
    .expect("bind outlet");
    let mut handle: OutletHandle = outlet.handle();
    let running = Running::spawn(|s| outlet.run(s));
    assert!(
        handle.wait_registered(Duration::from_secs(10)).await,
        "outlet {name} did not register"
    );
    Node {
        fingerprint,
        _running: running,
    }
}

/// Starts an inlet named `name` (role `echo-client`) with a listener for `service`; returns
/// it and the listener's address once its control connection is up.
async fn inlet(ca: &Ca, name: &str, relay: SocketAddr, service: &str) -> (Node, SocketAddr) {
    let (identity, fingerprint) = identity(ca, name, "echo-client");
    let inlet = Inlet::bind(InletOptions {
        relay: relay_target(relay),
        identity,
        roots: tls::roots_from_pem(ca.cert_pem()).expect("roots"),
        services: vec![InletService {
            name: svc(service),
            listen: "127.0.0.1:0".parse().expect("addr"),
            kind: ServiceKind::Tcp,
        }],
    })
    .await
    .expect("bind inlet");
    let addr = inlet.listen_addr(&svc(service)).expect("listener");
    let mut handle: InletHandle = inlet.handle();
    let running = Running::spawn(|s| inlet.run(s));
    assert!(
        handle.wait_connected(Duration::from_secs(10)).await,
        "inlet {name} did not connect"
    );
    (
        Node {
            fingerprint,
            _running: running,
        },
        addr,
    )
}

/// An open client connection that has had `len` bytes echoed through the tunnel.
async fn live_stream(addr: SocketAddr, len: usize) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.expect("connect inlet");
    let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
    s.write_all(&data).await.expect("write");
    let mut back = vec![0u8; len];
    tokio::time::timeout(Duration::from_secs(20), s.read_exact(&mut back))
        .await
        .expect("echo in time")
        .expect("read echo");
    assert_eq!(back, data);
    s
}

/// Waits until a stream ends (EOF, reset or error), at most `within`.
async fn assert_ends(mut s: TcpStream, within: Duration, what: &str) {
    let mut buf = [0u8; 1024];
    let ended = tokio::time::timeout(within, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(
        ended.is_ok(),
        "{what}: the stream is still open after {within:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// The API in process

/// Serves the admin API for `relay` on 127.0.0.1:0 with a token made in `dir`.
async fn admin_api(
    relay: &RelayHandle,
    dir: &Path,
    drain: Duration,
    stop: &CancellationToken,
) -> (SocketAddr, AdminToken) {
    let token = AdminToken::load_or_create(&dir.join(TOKEN_FILE)).expect("admin token");
    let listener = admin::bind("127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("bind admin API");
    let addr = listener.local_addr().expect("addr");
    let api = AdminApi::new(relay.clone(), token.clone(), drain);
    tokio::spawn(admin::serve(listener, Arc::new(api), stop.clone()));
    (addr, token)
}

/// One raw HTTP/1.1 exchange; returns (status, head, body).
async fn raw(
    addr: SocketAddr,
    method: &str,
    path: &str,
    authorization: Option<&str>,
) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).await.expect("connect admin API");
    let auth = authorization
        .map(|a| format!("Authorization: {a}\r\n"))
        .unwrap_or_default();
    s.write_all(
        format!("{method} {path} HTTP/1.1\r\nHost: relay\r\n{auth}Content-Length: 0\r\n\r\n")
            .as_bytes(),
    )
    .await
    .expect("write request");
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out))
        .await
        .expect("answer in time")
        .expect("read answer");
    let (head, body) = out.split_once("\r\n\r\n").expect("head and body");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {out:?}"));
    (status, head.to_ascii_lowercase(), body.to_owned())
}

/// The `error` of a JSON error body.
fn error_message(body: &str) -> String {
    serde_json::from_str::<ErrorBody>(body)
        .unwrap_or_else(|e| panic!("not a JSON error body ({e}): {body:?}"))
        .error
}

fn api_status(r: Result<impl std::fmt::Debug, ClientError>) -> u16 {
    match r {
        Err(ClientError::Api { status, .. }) => status,
        other => panic!("expected an API error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_refuses_strangers_and_shows_the_real_state() {
    init_logging();
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new();
    let (echo, _e) = echo_server().await;
    let relay = start_relay(&pki, "127.0.0.1:0".parse().expect("addr"), [7; 32], None);
    let stop = CancellationToken::new();
    let (api, token) = admin_api(&relay.handle, dir.path(), Duration::from_secs(1), &stop).await;

    // Strangers get 401 with a JSON body and a Bearer challenge, whatever they ask for.
    let mut wrong = token.expose().to_owned();
    let last = if wrong.ends_with('0') { "1" } else { "0" };
    wrong.replace_range(wrong.len() - 1.., last);
    let attempts = [
        ("GET", "/v1/nodes", None),
        ("GET", "/v1/nodes", Some(format!("Bearer {wrong}"))),
        (
            "GET",
            "/v1/nodes",
            Some(format!("Basic {}", token.expose())),
        ),
        ("GET", "/v1/nodes", Some("Bearer".to_string())),
        ("POST", "/v1/nodes/anyone/drain", None),
        ("GET", "/v1/no-such-thing", None),
    ];
    for (method, path, auth) in &attempts {
        let (status, head, body) = raw(api, method, path, auth.as_deref()).await;
        assert_eq!(status, 401, "{method} {path} with {auth:?}: {body}");
        assert!(
            head.contains("www-authenticate: bearer"),
            "no Bearer challenge: {head}"
        );
        assert!(head.contains("content-type: application/json"), "{head}");
        let message = error_message(&body);
        assert!(message.contains("token"), "{message}");
        assert!(!body.contains(token.expose()), "the token is in a 401 body");
    }
    let stats = relay.handle.admin_stats();
    assert_eq!(
        stats
            .requests_unauthorized
            .load(std::sync::atomic::Ordering::Relaxed),
        attempts.len() as u64
    );
    // The one with the right token gets in (an empty relay yet).
    let (status, _, body) = raw(
        api,
        "GET",
        "/v1/nodes",
        Some(&format!("bearer {}", token.expose())),
    )
    .await;
    assert_eq!(status, 200, "{body}");

    // Real nodes and a live stream.
    let started_ms = now_ms();
    let service = "adm-echo";
    let o = outlet(pki.ca(), "adm-outlet", relay.addr, service, echo).await;
    let (i, listen) = inlet(pki.ca(), "adm-inlet", relay.addr, service).await;
    let len = 48 * 1024;
    let _stream = live_stream(listen, len).await;

    let client = AdminClient::new(api, token.clone());
    let nodes: Nodes = client.get("/v1/nodes").await.expect("nodes");
    let by_name: HashMap<String, _> = nodes
        .nodes
        .iter()
        .map(|n| (n.name.to_string(), n.clone()))
        .collect();
    assert_eq!(
        by_name.keys().cloned().collect::<BTreeSet<_>>(),
        BTreeSet::from(["adm-inlet".to_string(), "adm-outlet".to_string()]),
        "{nodes:?}"
    );
    let on = &by_name["adm-outlet"];
    let inn = &by_name["adm-inlet"];
    assert_eq!(on.fingerprint.as_deref(), Some(o.fingerprint.as_str()));
    assert_eq!(inn.fingerprint.as_deref(), Some(i.fingerprint.as_str()));
    assert_eq!(on.role.as_deref(), Some("echo-outlet"));
    assert_eq!(inn.role.as_deref(), Some("echo-client"));
    assert_eq!(
        inn.attributes.get("role").map(String::as_str),
        Some("echo-client")
    );
    assert_eq!(on.services, vec![svc(service)]);
    assert!(inn.services.is_empty());
    assert_eq!((on.routes, inn.routes), (1, 1));
    for n in [on, inn] {
        assert!(n.remote_addr.ip().is_loopback(), "{n:?}");
        assert_ne!(n.remote_addr.port(), 0);
        assert!(
            n.connected_at_ms >= started_ms - 1000 && n.connected_at_ms <= now_ms(),
            "{n:?}"
        );
        assert!(!n.drained);
    }
    assert_ne!(on.remote_addr, inn.remote_addr);

    let services: ServiceList = client.get("/v1/services").await.expect("services");
    let listed: Vec<(String, Vec<String>)> = services
        .services
        .iter()
        .map(|s| {
            (
                s.name.to_string(),
                s.outlets.iter().map(|o| o.to_string()).collect(),
            )
        })
        .collect();
    assert_eq!(
        listed,
        vec![(service.to_string(), vec!["adm-outlet".to_string()])]
    );

    let routes: Routes = client.get("/v1/routes").await.expect("routes");
    assert_eq!(routes.routes.len(), 1, "{routes:?}");
    let r = &routes.routes[0];
    assert_eq!(
        (r.service.as_str(), r.inlet.as_str(), r.outlet.as_str()),
        (service, "adm-inlet", "adm-outlet")
    );
    // The echo went inlet -> outlet and back through this route, so both directions carried at
    // least the payload (plus QUIC and frame overhead).
    assert!(r.bytes_from_inlet >= len as u64, "{r:?}");
    assert!(r.bytes_from_outlet >= len as u64, "{r:?}");
    assert!(r.packets > 0, "{r:?}");
    let table_ids: Vec<String> = relay
        .handle
        .routes()
        .ids()
        .iter()
        .map(|id| id.to_string())
        .collect();
    assert_eq!(table_ids, vec![r.id.clone()]);

    // No authority in this relay: no tickets, said so.
    let tickets: Tickets = client.get("/v1/tickets").await.expect("tickets");
    assert!(!tickets.authority && tickets.tickets.is_empty());

    // Clear errors, as JSON.
    let auth = format!("Bearer {}", token.expose());
    let (status, _, body) = raw(api, "GET", "/v1/nope", Some(&auth)).await;
    assert_eq!(status, 404);
    assert!(error_message(&body).contains("/v1/nodes"), "{body}");
    let (status, head, body) = raw(api, "POST", "/v1/nodes", Some(&auth)).await;
    assert_eq!(status, 405, "{body}");
    assert!(head.contains("allow: get"), "{head}");
    error_message(&body);
    let (status, _, body) = raw(api, "GET", "/v1/nodes/adm-outlet/drain", Some(&auth)).await;
    assert_eq!(status, 405, "{body}");
    let (status, _, body) = raw(api, "POST", "/v1/nodes/ghost/drain", Some(&auth)).await;
    assert_eq!(status, 404, "{body}");
    assert!(error_message(&body).contains("ghost"), "{body}");
    let (status, _, body) = raw(api, "POST", "/v1/identities/ghost/revoke", Some(&auth)).await;
    assert_eq!(status, 404, "{body}");
    assert!(error_message(&body).contains("ghost"), "{body}");
    let (status, _, body) = raw(api, "POST", "/v1/nodes/Not_A_Name/drain", Some(&auth)).await;
    assert_eq!(status, 400, "{body}");
    error_message(&body);
    let (status, _, body) = raw(
        api,
        "POST",
        "/v1/nodes/adm-outlet/drain?timeout=soon",
        Some(&auth),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(error_message(&body).contains("timeout"), "{body}");
    // None of those touched the nodes.
    let nodes: Nodes = client.get("/v1/nodes").await.expect("nodes");
    assert_eq!(nodes.nodes.len(), 2);
    assert!(nodes.nodes.iter().all(|n| !n.drained));
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_through_the_api_cuts_the_node_off() {
    init_logging();
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new();
    let (echo, _e) = echo_server().await;
    let relay = start_relay(&pki, "127.0.0.1:0".parse().expect("addr"), [8; 32], None);
    let stop = CancellationToken::new();
    let (api, token) = admin_api(&relay.handle, dir.path(), Duration::from_secs(1), &stop).await;
    let client = AdminClient::new(api, token);
    let service = "rev-echo";
    let _o = outlet(pki.ca(), "rev-outlet", relay.addr, service, echo).await;
    let (_i, listen) = inlet(pki.ca(), "rev-inlet", relay.addr, service).await;
    let open = live_stream(listen, 1024).await;

    let revoked_at = Instant::now();
    let done: Revoked = client
        .post("/v1/identities/rev-inlet/revoke")
        .await
        .expect("revoke");
    assert_eq!(done.revoked, node("rev-inlet"));
    assert!(done.was_connected);
    assert!(!done.persisted, "this relay has no authority to record it");

    // Its open connection is cut at once, and it cannot open another.
    assert_ends(open, Duration::from_secs(3), "revoked inlet's stream").await;
    assert!(revoked_at.elapsed() < Duration::from_secs(3));
    assert_eq!(echo_once(listen, b"again").await, None);
    let names = || async {
        let nodes: Nodes = client.get("/v1/nodes").await.expect("nodes");
        nodes
            .nodes
            .iter()
            .map(|n| n.name.to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(names().await, vec!["rev-outlet".to_string()]);
    let ids: Identities = client.get("/v1/identities").await.expect("identities");
    let rev = ids
        .identities
        .iter()
        .find(|i| i.name.as_str() == "rev-inlet")
        .unwrap_or_else(|| panic!("rev-inlet not listed: {ids:?}"));
    assert!(rev.revoked && !rev.connected, "{rev:?}");
    // It keeps trying, more and more slowly (a permanent refusal backs off from 1-2 s to
    // minutes), and keeps being refused.
    let refused = || {
        relay
            .handle
            .control_stats()
            .handshake_failures
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    let before = refused();
    eventually(
        Duration::from_secs(10),
        "the revoked inlet tried again",
        || async { refused() > before },
    )
    .await;
    assert_eq!(names().await, vec!["rev-outlet".to_string()]);
    assert_eq!(echo_once(listen, b"again").await, None);

    // Revoking again is harmless; the outlet was not touched.
    let again: Revoked = client
        .post("/v1/identities/rev-inlet/revoke")
        .await
        .expect("revoke again");
    assert!(!again.was_connected);
    let services: ServiceList = client.get("/v1/services").await.expect("services");
    assert_eq!(services.services[0].outlets, vec![node("rev-outlet")]);
    assert_eq!(
        relay
            .handle
            .admin_stats()
            .revocations
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_moves_new_routes_away_then_closes_the_node() {
    init_logging();
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new();
    let (echo, _e) = echo_server().await;
    let relay = start_relay(&pki, "127.0.0.1:0".parse().expect("addr"), [9; 32], None);
    let stop = CancellationToken::new();
    let (api, token) = admin_api(&relay.handle, dir.path(), Duration::from_secs(30), &stop).await;
    let client = AdminClient::new(api, token);
    let service = "drain-echo";
    let _d1 = outlet(pki.ca(), "drain-o1", relay.addr, service, echo).await;
    let _d2 = outlet(pki.ca(), "drain-o2", relay.addr, service, echo).await;
    let (_i1, listen1) = inlet(pki.ca(), "drain-i1", relay.addr, service).await;
    let open = live_stream(listen1, 1024).await;
    let routes = || async {
        let r: Routes = client.get("/v1/routes").await.expect("routes");
        r.routes
            .iter()
            .map(|r| (r.inlet.to_string(), r.outlet.to_string()))
            .collect::<BTreeSet<_>>()
    };
    // The first route goes to the first outlet that registered.
    assert_eq!(
        routes().await,
        BTreeSet::from([("drain-i1".to_string(), "drain-o1".to_string())])
    );

    let d: Draining = client
        .post("/v1/nodes/drain-o1/drain?timeout=2s")
        .await
        .expect("drain");
    assert_eq!(d.draining, node("drain-o1"));
    assert_eq!(d.services, vec![svc(service)]);
    assert_eq!(d.open_routes, 1);
    assert_eq!(d.timeout_ms, 2000);
    let services: ServiceList = client.get("/v1/services").await.expect("services");
    assert_eq!(services.services[0].outlets, vec![node("drain-o2")]);
    let nodes: Nodes = client.get("/v1/nodes").await.expect("nodes");
    let drained: Vec<String> = nodes
        .nodes
        .iter()
        .filter(|n| n.drained)
        .map(|n| n.name.to_string())
        .collect();
    assert_eq!(drained, vec!["drain-o1".to_string()]);

    // New inlets get routes to the other outlet only (in turn, one of the two would have
    // gone to drain-o1), while the drained one's open stream keeps working.
    let (_i2, listen2) = inlet(pki.ca(), "drain-i2", relay.addr, service).await;
    let (_i3, listen3) = inlet(pki.ca(), "drain-i3", relay.addr, service).await;
    for l in [listen2, listen3] {
        assert_eq!(echo_once(l, b"hi").await.as_deref(), Some(&b"hi"[..]));
    }
    assert_eq!(
        routes().await,
        BTreeSet::from([
            ("drain-i1".to_string(), "drain-o1".to_string()),
            ("drain-i2".to_string(), "drain-o2".to_string()),
            ("drain-i3".to_string(), "drain-o2".to_string()),
        ])
    );
    let mut open = open;
    open.write_all(b"still").await.expect("write");
    let mut back = [0u8; 5];
    open.read_exact(&mut back)
        .await
        .expect("open stream works while draining");
    assert_eq!(&back, b"still");

    // At the drain timeout the node is closed with its route; its inlet moves to drain-o2.
    let names = || async {
        let nodes: Nodes = client.get("/v1/nodes").await.expect("nodes");
        nodes
            .nodes
            .iter()
            .map(|n| n.name.to_string())
            .collect::<BTreeSet<_>>()
    };
    eventually(
        Duration::from_secs(6),
        "the drained outlet was closed",
        || async { !names().await.contains("drain-o1") },
    )
    .await;
    assert_ends(
        open,
        Duration::from_secs(5),
        "stream through the drained outlet",
    )
    .await;
    eventually(
        Duration::from_secs(10),
        "drain-i1 reaches the service again",
        || async { echo_once(listen1, b"back").await.as_deref() == Some(&b"back"[..]) },
    )
    .await;
    assert!(routes()
        .await
        .contains(&("drain-i1".to_string(), "drain-o2".to_string())));
    // It stays out while drained, although it keeps reconnecting (backoff at most 2 s): the
    // time watched is the test, longer than one backoff.
    let watch_until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < watch_until {
        assert!(
            !names().await.contains("drain-o1"),
            "a drained node got back in"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Let back in, it reconnects and serves again.
    let u: Undrained = client
        .post("/v1/nodes/drain-o1/undrain")
        .await
        .expect("undrain");
    assert!(u.was_drained);
    eventually(
        Duration::from_secs(10),
        "the undrained outlet is back",
        || async {
            let s: ServiceList = client.get("/v1/services").await.expect("services");
            s.services[0].outlets.iter().collect::<BTreeSet<_>>()
                == BTreeSet::from([&node("drain-o1"), &node("drain-o2")])
        },
    )
    .await;
    let again: Undrained = client
        .post("/v1/nodes/drain-o1/undrain")
        .await
        .expect("undrain again");
    assert!(!again.was_drained);
    assert_eq!(
        api_status(client.post::<Draining>("/v1/nodes/drain-gone/drain").await),
        404
    );
    stop.cancel();
}

// ---------------------------------------------------------------------------------------------
// The real binary

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_prints_the_real_state_of_a_running_relay() {
    init_logging();
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("relay-state");
    let state_s = state.display().to_string();
    let (ok, _, err) = cli_output("postern-relay", &["ca", "init", "--state-dir", &state_s]).await;
    assert!(ok, "ca init: {err}");
    let relay_addr = free_udp_addr();
    let (ok, _, err) = cli_output(
        "postern-relay",
        &[
            "ticket",
            "create",
            "--attr",
            "role=echo-client",
            "--relay",
            &relay_addr.to_string(),
            "--state-dir",
            &state_s,
        ],
    )
    .await;
    assert!(ok, "ticket create: {err}");
    let ca = postern_relay::state::StateDir::new(&state)
        .load_ca()
        .expect("load CA");

    let admin_addr = format!("127.0.0.1:{}", free_port());
    let log_path = dir.path().join("relay.log");
    let mut relay = Command::new(bin("postern-relay"))
        .args([
            "run",
            "--state-dir",
            &state_s,
            "--listen",
            &relay_addr.to_string(),
            "--admin-addr",
            &admin_addr,
            "--allow-register",
            "st-echo=role = \"echo-outlet\"",
            "--allow-route",
            "st-echo=role = \"echo-client\"",
            "--drain-timeout",
            "1s",
        ])
        .env("POSTERN_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).expect("log file"))
        .kill_on_drop(true)
        .spawn()
        .expect("start postern-relay");
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let status_args = [
        "status",
        "--admin-addr",
        &admin_addr,
        "--state-dir",
        &state_s,
    ];

    // The token is made at first start, private; `status` works once the relay is up.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(Some(exit)) = relay.try_wait() {
            panic!("relay exited ({exit}): {}", log());
        }
        if cli_output("postern-relay", &status_args).await.0 {
            break;
        }
        assert!(Instant::now() < deadline, "status never worked: {}", log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let token_path = state.join(TOKEN_FILE);
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&token_path)
            .expect("token file")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let token = AdminToken::load(&token_path).expect("token");

    let (echo, _e) = echo_server().await;
    let _o = outlet(&ca, "st-outlet", relay_addr, "st-echo", echo).await;
    let (_i, listen) = inlet(&ca, "st-inlet", relay_addr, "st-echo").await;
    let _open = live_stream(listen, 4096).await;

    let (ok, out, err) = cli_output("postern-relay", &status_args).await;
    assert!(ok, "status: {err}");
    for want in [
        "nodes: 2",
        "st-outlet  role=echo-outlet",
        "st-inlet  role=echo-client",
        "serves st-echo",
        "services: 1",
        "st-echo  outlets: st-outlet",
        "routes: 1",
        "st-echo  st-inlet -> st-outlet",
        "tickets: 1 (1 valid, 0 used, 0 expired)",
        "identities: 0 (0 revoked)",
    ] {
        assert!(out.contains(want), "status lacks {want:?}:\n{out}");
    }
    assert!(!out.contains(token.expose()) && !err.contains(token.expose()));
    let (ok, json, err) =
        cli_output("postern-relay", &[&status_args[..], &["--json"]].concat()).await;
    assert!(ok, "status --json: {err}");
    let v: serde_json::Value = serde_json::from_str(&json).expect("status --json is JSON");
    assert_eq!(v["nodes"]["nodes"].as_array().map(Vec::len), Some(2), "{v}");
    assert_eq!(v["routes"]["routes"][0]["outlet"], "st-outlet", "{v}");
    assert!(
        v["tickets"]["tickets"][0].get("secret_sha256").is_none() && !json.contains("secret"),
        "ticket secrets in the status: {json}"
    );

    // A wrong token file is refused, and the message says why without echoing it.
    let bad = dir.path().join("bad.token");
    std::fs::write(&bad, "0123456789abcdef0123456789abcdef").expect("write");
    let (ok, _, err) = cli_output(
        "postern-relay",
        &[
            "status",
            "--admin-addr",
            &admin_addr,
            "--admin-token-file",
            &bad.display().to_string(),
        ],
    )
    .await;
    assert!(!ok, "status with a wrong token succeeded");
    assert!(err.contains("401"), "{err}");
    assert!(!err.contains("0123456789abcdef"), "{err}");

    // Revoking through the API on a relay that runs the authority is recorded in its files.
    let client = AdminClient::new(admin_addr.parse().expect("addr"), token.clone());
    let done: Revoked = client
        .post("/v1/identities/st-inlet/revoke")
        .await
        .expect("revoke");
    assert!(done.persisted && done.was_connected, "{done:?}");
    let (ok, list, err) = cli_output(
        "postern-relay",
        &["identity", "list", "--state-dir", &state_s],
    )
    .await;
    assert!(ok, "identity list: {err}");
    assert!(
        list.lines()
            .any(|l| l.starts_with("st-inlet") && l.contains("REVOKED")),
        "{list}"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    let out = loop {
        let (ok, out, err) = cli_output("postern-relay", &status_args).await;
        assert!(ok, "status: {err}");
        if out.contains("nodes: 1") && out.contains("identities: 1 (1 revoked: st-inlet)") {
            break out;
        }
        assert!(
            Instant::now() < deadline,
            "status never showed the revocation:\n{out}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(!out.contains("st-inlet  role"), "{out}");

    // Once the relay is gone, `status` says so.
    let pid = relay.id().expect("pid").to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(killed.success());
    let exit = tokio::time::timeout(Duration::from_secs(15), relay.wait())
        .await
        .expect("relay exits")
        .expect("wait");
    assert!(exit.success(), "relay: {exit}\n{}", log());
    let (ok, _, err) = cli_output("postern-relay", &status_args).await;
    assert!(!ok, "status succeeded without a relay");
    assert!(err.contains("is the relay running"), "{err}");
    assert!(
        !log().contains(token.expose()),
        "the token is in the relay's log"
    );
}
