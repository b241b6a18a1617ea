//! Reloading a running outlet's or inlet's config with `SIGHUP` (real relay, outlet and inlet
//! processes). Outlet: a service added is used at once, an `allow` tightened closes the open
//! connection it no longer admits and refuses new ones while another service's open connection
//! keeps going, and an invalid config is refused with its error logged while the one in force
//! keeps working. Inlet: a listener added is used at once, one removed stops accepting and has
//! its open connections closed, and an invalid config is refused the same way. Relay (by
//! SIGHUP and by `postern-relay reload` through its admin API): a tightened route policy closes
//! the open routes it refuses and keeps the others, a new `log-level` takes effect, and an
//! invalid config is refused with its error while the one in force stays.
//!
//! Build the binaries first with `cargo build --bins` (scripts/test.sh does).

use postern_tests::kit::init_logging;
use postern_tests::ports::{free_port, free_udp_addr};
use postern_tests::procs::{Proc, RelayCa};
use postern_tests::traffic::echo_server;
use postern_tests::wait::eventually;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One round trip on an open connection: true if `msg` came back within 5 s.
async fn echoes(s: &mut TcpStream, msg: &[u8]) -> bool {
    if s.write_all(msg).await.is_err() {
        return false;
    }
    let mut back = vec![0u8; msg.len()];
    matches!(
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut back)).await,
        Ok(Ok(_)) if back == msg
    )
}

/// A new connection through the inlet's listener `addr`, if it echoes.
async fn fresh_echo(addr: SocketAddr) -> Option<TcpStream> {
    let mut s = TcpStream::connect(addr).await.ok()?;
    echoes(&mut s, b"hello").await.then_some(s)
}

/// Whether the connection has been closed (EOF or reset) within 10 s.
async fn closed(s: &mut TcpStream) -> bool {
    let mut buf = [0u8; 16];
    matches!(
        tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

fn outlet_config(path: &Path, services: &[(&str, SocketAddr, &str)]) {
    let mut text = String::new();
    for (name, to, allow) in services {
        text.push_str(&format!(
            "[[service]]\nname = \"{name}\"\nto = \"{to}\"\nallow = '{allow}'\n\n"
        ));
    }
    std::fs::write(path, text).expect("write outlet config");
}

/// Puts `log-level = LEVEL` at the top of the config file at `path`.
fn with_log_level(path: &Path, level: &str) {
    let text = std::fs::read_to_string(path).expect("read config");
    std::fs::write(path, format!("log-level = \"{level}\"\n\n{text}")).expect("write config");
}

/// How many reloads began while debug logging was in force: each logs this line at debug
/// level as it starts.
fn debug_rereads(p: &Proc) -> usize {
    p.log()
        .matches("rereading the command line and config file")
        .count()
}

fn reloads(outlet: &Proc) -> usize {
    outlet.log().matches("config reloaded").count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_outlets_services_and_allow() {
    init_logging();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = |p: &str| dir.path().join(p).display().to_string();
    let state = path("relay-state");
    let relay_addr = free_udp_addr().to_string();
    let ca = RelayCa::init(&state, &relay_addr).await;
    let relay_ops: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let mut relay = Proc::spawn(
        dir.path(),
        "relay",
        "postern-relay",
        &[
            "run",
            "--state-dir",
            &state,
            "--listen",
            &relay_addr,
            "--allow-register",
            "echo=role = \"echo-outlet\"",
            "--allow-register",
            "second=role = \"echo-outlet\"",
            "--allow-route",
            "echo=role = \"echo-client\"",
            "--allow-route",
            "second=role = \"echo-client\"",
            "--metrics-addr",
            &relay_ops.to_string(),
            "--drain-timeout",
            "1s",
        ],
    );
    relay.wait_ready(relay_ops).await;

    let (echo, _e) = echo_server().await;
    let config = dir.path().join("outlet.toml");
    outlet_config(&config, &[("echo", echo, "name = \"inlet-a\"")]);
    let outlet_ops: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let outlet_ticket = ca.ticket("echo-outlet").await;
    let mut outlet = Proc::spawn(
        dir.path(),
        "outlet",
        "postern-outlet",
        &[
            "run",
            "--config",
            &config.display().to_string(),
            "--ticket",
            &outlet_ticket,
            "--name",
            "outlet-a",
            "--state-dir",
            &path("outlet-state"),
            "--metrics-addr",
            &outlet_ops.to_string(),
            "--drain-timeout",
            "1s",
        ],
    );
    outlet.wait_ready(outlet_ops).await;

    let inlet_ticket = ca.ticket("echo-client").await;
    let (l1, l2): (SocketAddr, SocketAddr) = (
        format!("127.0.0.1:{}", free_port()).parse().expect("addr"),
        format!("127.0.0.1:{}", free_port()).parse().expect("addr"),
    );
    let inlet_ops: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let mut inlet = Proc::spawn(
        dir.path(),
        "inlet-a",
        "postern-inlet",
        &[
            "run",
            "--ticket",
            &inlet_ticket,
            "--name",
            "inlet-a",
            "--state-dir",
            &path("inlet-state"),
            "--service",
            &format!("echo={l1}"),
            "--service",
            &format!("second={l2}"),
            "--metrics-addr",
            &inlet_ops.to_string(),
            "--drain-timeout",
            "1s",
        ],
    );
    inlet.wait_ready(inlet_ops).await;
    let logs = || {
        format!(
            "--- relay\n{}\n--- outlet\n{}\n--- inlet\n{}",
            relay.log(),
            outlet.log(),
            inlet.log()
        )
    };
    assert!(
        fresh_echo(l1).await.is_some(),
        "echo before any reload:\n{}",
        logs()
    );
    assert!(
        fresh_echo(l2).await.is_none(),
        "`second` answered before the outlet offered it"
    );

    // A service added by SIGHUP is used at once.
    outlet_config(
        &config,
        &[
            ("echo", echo, "name = \"inlet-a\""),
            ("second", echo, "name = \"inlet-a\""),
        ],
    );
    with_log_level(&config, "debug");
    outlet.sighup();
    eventually(Duration::from_secs(10), "the first reload", || async {
        reloads(&outlet) == 1
    })
    .await;
    // It began at the level the outlet started with (info) and put debug in force.
    assert_eq!(debug_rereads(&outlet), 0, "{}", outlet.log());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut kept = loop {
        if let Some(s) = fresh_echo(l2).await {
            break s;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the added service never answered:\n{}",
            logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    // Tighten `echo`'s allow: its open connection is closed, a new one gets nothing, while
    // the open connection to `second` (still allowed) keeps going.
    let mut open = fresh_echo(l1).await.expect("an open connection to echo");
    outlet_config(
        &config,
        &[
            ("echo", echo, "name = \"somebody-else\""),
            ("second", echo, "name = \"inlet-a\""),
        ],
    );
    with_log_level(&config, "debug");
    outlet.sighup();
    eventually(Duration::from_secs(10), "the second reload", || async {
        reloads(&outlet) == 2
    })
    .await;
    assert_eq!(
        debug_rereads(&outlet),
        1,
        "the reloaded log level is not in force:\n{}",
        outlet.log()
    );
    assert!(
        closed(&mut open).await,
        "the connection the new allow refuses is still open:\n{}",
        logs()
    );
    assert!(
        fresh_echo(l1).await.is_none(),
        "a new connection the new allow refuses was served"
    );
    assert!(
        echoes(&mut kept, b"still here").await,
        "the allowed connection was cut by the reload:\n{}",
        logs()
    );

    // An invalid config is refused, the error logged, and the config in force stays.
    std::fs::write(
        &config,
        "[[service]]\nname = \"second\"\nto = \"127.0.0.1:1\"\nallow = 'name = '\n",
    )
    .expect("write invalid config");
    outlet.sighup();
    eventually(
        Duration::from_secs(10),
        "the refused reload logged",
        || async { outlet.log().contains("reload refused") },
    )
    .await;
    let log = outlet.log();
    let line = log
        .lines()
        .find(|l| l.contains("reload refused"))
        .expect("the refusal line");
    assert!(
        line.contains("allow"),
        "the refusal does not name the error: {line}"
    );
    assert_eq!(reloads(&outlet), 2, "the invalid config was put in force");
    assert!(
        echoes(&mut kept, b"after the invalid one").await,
        "the open connection was cut by a refused reload"
    );
    assert!(
        fresh_echo(l2).await.is_some(),
        "`second` stopped answering after a refused reload:\n{}",
        logs()
    );
    assert!(
        fresh_echo(l1).await.is_none(),
        "echo came back after a refused reload"
    );
}

fn inlet_config(path: &Path, services: &[(&str, SocketAddr)]) {
    let mut text = String::new();
    for (name, listen) in services {
        text.push_str(&format!(
            "[[service]]\nname = \"{name}\"\nlisten = \"{listen}\"\n\n"
        ));
    }
    std::fs::write(path, text).expect("write inlet config");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_inlets_listeners() {
    init_logging();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = |p: &str| dir.path().join(p).display().to_string();
    let state = path("relay-state");
    let relay_addr = free_udp_addr().to_string();
    let ca = RelayCa::init(&state, &relay_addr).await;
    let relay_ops: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let mut relay = Proc::spawn(
        dir.path(),
        "relay",
        "postern-relay",
        &[
            "run",
            "--state-dir",
            &state,
            "--listen",
            &relay_addr,
            "--allow-register",
            "echo=role = \"echo-outlet\"",
            "--allow-register",
            "second=role = \"echo-outlet\"",
            "--allow-route",
            "echo=role = \"echo-client\"",
            "--allow-route",
            "second=role = \"echo-client\"",
            "--metrics-addr",
            &relay_ops.to_string(),
        ],
    );
    relay.wait_ready(relay_ops).await;
    let (echo, _e) = echo_server().await;
    let outlet_ops: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let outlet_ticket = ca.ticket("echo-outlet").await;
    let mut outlet = Proc::spawn(
        dir.path(),
        "outlet",
        "postern-outlet",
        &[
            "run",
            "--ticket",
            &outlet_ticket,
            "--name",
            "outlet-a",
            "--state-dir",
            &path("outlet-state"),
            "--service",
            &format!("echo={echo}"),
            "--service",
            &format!("second={echo}"),
            "--metrics-addr",
            &outlet_ops.to_string(),
        ],
    );
    outlet.wait_ready(outlet_ops).await;

    let (l1, l2): (SocketAddr, SocketAddr) = (
        format!("127.0.0.1:{}", free_port()).parse().expect("addr"),
        format!("127.0.0.1:{}", free_port()).parse().expect("addr"),
    );
    let config = dir.path().join("inlet.toml");
    inlet_config(&config, &[("echo", l1)]);
    let inlet_ticket = ca.ticket("echo-client").await;
    let inlet_ops: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let mut inlet = Proc::spawn(
        dir.path(),
        "inlet",
        "postern-inlet",
        &[
            "run",
            "--config",
            &config.display().to_string(),
            "--ticket",
            &inlet_ticket,
            "--name",
            "inlet-a",
            "--state-dir",
            &path("inlet-state"),
            "--metrics-addr",
            &inlet_ops.to_string(),
        ],
    );
    inlet.wait_ready(inlet_ops).await;
    let logs = || format!("--- inlet\n{}\n--- outlet\n{}", inlet.log(), outlet.log());
    let mut open = fresh_echo(l1).await.expect("echo before any reload");
    assert!(
        TcpStream::connect(l2).await.is_err(),
        "l2 listens before the reload"
    );

    // A listener added by SIGHUP is used at once.
    inlet_config(&config, &[("echo", l1), ("second", l2)]);
    with_log_level(&config, "debug");
    inlet.sighup();
    eventually(
        Duration::from_secs(10),
        "the inlet's first reload",
        || async { inlet.log().matches("config reloaded").count() == 1 },
    )
    .await;
    eventually(
        Duration::from_secs(20),
        "the added listener answering",
        || async { fresh_echo(l2).await.is_some() },
    )
    .await;
    let mut kept = fresh_echo(l2)
        .await
        .expect("an open connection to `second`");

    // A listener removed stops accepting, and its open connection is closed; the other
    // listener's open connection keeps going.
    assert_eq!(debug_rereads(&inlet), 0, "{}", inlet.log());
    inlet_config(&config, &[("second", l2)]);
    with_log_level(&config, "debug");
    inlet.sighup();
    eventually(
        Duration::from_secs(10),
        "the removed listener closed",
        || async { TcpStream::connect(l1).await.is_err() },
    )
    .await;
    assert_eq!(
        debug_rereads(&inlet),
        1,
        "the reloaded log level is not in force:\n{}",
        inlet.log()
    );
    assert!(
        closed(&mut open).await,
        "a connection open on the removed listener was left running:\n{}",
        logs()
    );
    assert!(
        echoes(&mut kept, b"the other listener's connection").await,
        "the reload cut a connection of a listener it kept:\n{}",
        logs()
    );
    let metrics = postern_tests::ops::get(inlet_ops, "/metrics")
        .await
        .expect("inlet metrics")
        .1;
    // At least the open connection; the probes that waited for the listener to go may have
    // connected just before it did, and were closed the same way.
    let closed_by_reload = postern_tests::ops::metric(
        &metrics,
        "postern_inlet_connections_closed_by_reload_total",
        &[("service", "echo")],
    );
    assert!(closed_by_reload.is_some_and(|n| n >= 1.0), "{metrics}");

    // An invalid config is refused and the listeners in force stay.
    std::fs::write(
        &config,
        "[[service]]\nname = \"second\"\nlisten = \"127.0.0.1:1\"\nprotocol = \"sctp\"\n",
    )
    .expect("write invalid config");
    inlet.sighup();
    eventually(
        Duration::from_secs(10),
        "the refused reload logged",
        || async { inlet.log().contains("reload refused") },
    )
    .await;
    let log = inlet.log();
    let line = log
        .lines()
        .find(|l| l.contains("reload refused"))
        .expect("the refusal line");
    assert!(
        line.contains("sctp"),
        "the refusal does not name the error: {line}"
    );
    assert!(
        fresh_echo(l2).await.is_some(),
        "the listener in force stopped after a refused reload:\n{}",
        logs()
    );

    // An invalid log level is refused the same way, and the level in force (debug) stays:
    // the next reload still begins at debug.
    inlet_config(&config, &[("second", l2)]);
    with_log_level(&config, "loud");
    inlet.sighup();
    eventually(
        Duration::from_secs(10),
        "the second refused reload logged",
        || async { inlet.log().matches("reload refused").count() == 2 },
    )
    .await;
    let log = inlet.log();
    let line = log
        .lines()
        .filter(|l| l.contains("reload refused"))
        .nth(1)
        .expect("the second refusal line");
    assert!(
        line.contains("log-level") && line.contains("loud"),
        "the refusal does not name the error: {line}"
    );
    inlet_config(&config, &[("second", l2)]);
    inlet.sighup();
    eventually(Duration::from_secs(10), "a valid reload", || async {
        inlet.log().matches("config reloaded").count() == 3
    })
    .await;
    assert_eq!(debug_rereads(&inlet), 4, "{}", inlet.log());
    assert!(
        echoes(&mut kept, b"after the refused level").await,
        "a reload cut the kept connection:\n{}",
        logs()
    );
}

fn relay_config(path: &Path, listen: &str, state: &str, route: &str) {
    std::fs::write(
        path,
        format!(
            "listen = \"{listen}\"\nstate-dir = \"{state}\"\n\n[[policy]]\nservice = \"echo\"\n\
             register = 'role = \"echo-outlet\"'\nroute = '{route}'\n"
        ),
    )
    .expect("write relay config");
}

/// Starts the relay on `config`, and an outlet, `outlet-a`, offering `echo` (a fresh echo
/// server) through it; returns once both are ready, with the relay's metrics address. The
/// set-up both relay reload tests share.
async fn relay_with_echo_outlet(
    dir: &Path,
    ca: &RelayCa,
    config: &Path,
) -> (Proc, SocketAddr, Proc, tokio::task::JoinHandle<()>) {
    let relay_ops: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let mut relay = Proc::spawn(
        dir,
        "relay",
        "postern-relay",
        &[
            "run",
            "--config",
            &config.display().to_string(),
            "--metrics-addr",
            &relay_ops.to_string(),
        ],
    );
    relay.wait_ready(relay_ops).await;
    let (echo, echo_task) = echo_server().await;
    let outlet_ops: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let outlet_ticket = ca.ticket("echo-outlet").await;
    let mut outlet = Proc::spawn(
        dir,
        "outlet",
        "postern-outlet",
        &[
            "run",
            "--ticket",
            &outlet_ticket,
            "--name",
            "outlet-a",
            "--state-dir",
            &dir.join("outlet-state").display().to_string(),
            "--service",
            &format!("echo={echo}"),
            "--metrics-addr",
            &outlet_ops.to_string(),
        ],
    );
    outlet.wait_ready(outlet_ops).await;
    (relay, relay_ops, outlet, echo_task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_relays_policy_for_new_and_open_routes() {
    init_logging();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = |p: &str| dir.path().join(p).display().to_string();
    let state = path("relay-state");
    let relay_addr = free_udp_addr().to_string();
    let ca = RelayCa::init(&state, &relay_addr).await;
    let config = dir.path().join("relay.toml");
    relay_config(&config, &relay_addr, &state, "role = \"echo-client\"");
    let (relay, _, _outlet, _echo) = relay_with_echo_outlet(dir.path(), &ca, &config).await;
    let inlet = |name: &'static str, ticket: String| {
        let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        let ops: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        let p = Proc::spawn(
            dir.path(),
            name,
            "postern-inlet",
            &[
                "run",
                "--ticket",
                &ticket,
                "--name",
                name,
                "--state-dir",
                &path(&format!("{name}-state")),
                "--service",
                &format!("echo={listen}"),
                "--metrics-addr",
                &ops.to_string(),
            ],
        );
        (p, listen, ops)
    };
    let (mut first, l1, ops1) = inlet("inlet-first", ca.ticket("echo-client").await);
    first.wait_ready(ops1).await;
    let mut open = fresh_echo(l1).await.expect("echo before the reload");

    // The route rule tightened: a new inlet's route is refused, the open route keeps going.
    relay_config(&config, &relay_addr, &state, "role = \"somebody-else\"");
    relay.sighup();
    eventually(Duration::from_secs(10), "the relay's reload", || async {
        relay.log().contains("config reloaded")
    })
    .await;
    let (mut second, l2, ops2) = inlet("inlet-second", ca.ticket("echo-client").await);
    second.wait_ready(ops2).await;
    assert!(
        fresh_echo(l2).await.is_none(),
        "a route the reloaded policy refuses was granted:\n{}",
        relay.log()
    );
    assert!(
        closed(&mut open).await,
        "the open route the reloaded policy refuses was left running:\n{}",
        relay.log()
    );

    // An invalid config is refused with its error, and the policy in force stays.
    std::fs::write(&config, "listen = \"not an address\"\n").expect("write invalid config");
    relay.sighup();
    eventually(
        Duration::from_secs(10),
        "the refused reload logged",
        || async { relay.log().contains("reload refused") },
    )
    .await;
    assert_eq!(relay.log().matches("config reloaded").count(), 1);
    assert!(
        fresh_echo(l2).await.is_none(),
        "the refused config changed the policy"
    );
}

/// A relay config with an admin API, a log level and one `echo` policy.
fn relay_admin_config(
    path: &Path,
    listen: &str,
    state: &str,
    admin: SocketAddr,
    level: &str,
    route: &str,
) {
    std::fs::write(
        path,
        format!(
            "listen = \"{listen}\"\nstate-dir = \"{state}\"\nadmin-addr = \"{admin}\"\n\
             log-level = \"{level}\"\n\n[[policy]]\nservice = \"echo\"\n\
             register = 'role = \"echo-outlet\"'\nroute = '{route}'\n"
        ),
    )
    .expect("write relay config");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_reload_command_closes_refused_routes_and_changes_the_log_level() {
    init_logging();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = |p: &str| dir.path().join(p).display().to_string();
    let state = path("relay-state");
    let relay_addr = free_udp_addr().to_string();
    let ca = RelayCa::init(&state, &relay_addr).await;
    let config = dir.path().join("relay.toml");
    let config_arg = config.display().to_string();
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let everyone = "role = \"echo-client\"";
    relay_admin_config(&config, &relay_addr, &state, admin, "info", everyone);
    let (relay, relay_ops, _outlet, _echo) = relay_with_echo_outlet(dir.path(), &ca, &config).await;
    let mut inlets = Vec::new();
    let mut listens = Vec::new();
    for (name, team) in [("inlet-a", "team=a"), ("inlet-b", "team=b")] {
        let ticket = ca.ticket_with(&["role=echo-client", team]).await;
        let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        let ops: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        let mut p = Proc::spawn(
            dir.path(),
            name,
            "postern-inlet",
            &[
                "run",
                "--ticket",
                &ticket,
                "--name",
                name,
                "--state-dir",
                &path(&format!("{name}-state")),
                "--service",
                &format!("echo={listen}"),
                "--metrics-addr",
                &ops.to_string(),
            ],
        );
        p.wait_ready(ops).await;
        inlets.push(p);
        listens.push(listen);
    }
    let (la, lb) = (listens[0], listens[1]);
    let logs = || {
        let mut out = format!("--- relay\n{}", relay.log());
        for p in &inlets {
            out.push_str(&format!("\n--- {}\n{}", p.name, p.log()));
        }
        out
    };
    let mut a = fresh_echo(la).await.expect("inlet-a before the reload");
    let mut b = fresh_echo(lb).await.expect("inlet-b before the reload");
    assert!(
        !relay.log().contains("DEBUG"),
        "debug lines at log-level info:\n{}",
        relay.log()
    );

    // The reload command is for the token holder only.
    let wrong = dir.path().join("wrong.token");
    std::fs::write(&wrong, "0123456789abcdef0123456789abcdef").expect("write token");
    let err = postern_tests::procs::cli_fails(
        "postern-relay",
        &[
            "reload",
            "--admin-addr",
            &admin.to_string(),
            "--admin-token-file",
            &wrong.display().to_string(),
        ],
    )
    .await;
    assert!(err.contains("401"), "{err}");
    assert_eq!(relay.log().matches("config reloaded").count(), 0);

    // Only team a may reach `echo` now, at log level debug.
    relay_admin_config(
        &config,
        &relay_addr,
        &state,
        admin,
        "debug",
        "role = \"echo-client\" and team = \"a\"",
    );
    let out =
        postern_tests::procs::cli("postern-relay", &["reload", "--config", &config_arg]).await;
    assert!(
        out.contains("log level debug") && out.contains("1 live route(s) closed"),
        "{out}"
    );
    assert!(
        closed(&mut b).await,
        "inlet-b's open stream outlived the policy that refuses it:\n{}",
        logs()
    );
    assert!(
        fresh_echo(lb).await.is_none(),
        "a new route for inlet-b was granted:\n{}",
        logs()
    );
    // inlet-a's stream keeps going, every byte intact.
    let payload: Vec<u8> = (0..64 * 1024u32).map(|i| (i % 251) as u8).collect();
    assert!(
        echoes(&mut a, &payload).await,
        "the reload cut the route it still allows:\n{}",
        logs()
    );
    assert!(
        fresh_echo(la).await.is_some(),
        "inlet-a refused after the reload"
    );
    let metrics = postern_tests::ops::get(relay_ops, "/metrics")
        .await
        .expect("relay metrics")
        .1;
    assert_eq!(
        postern_tests::ops::metric(&metrics, "postern_relay_routes_closed_by_policy_total", &[]),
        Some(1.0),
        "{metrics}"
    );
    let log = relay.log();
    let line = log
        .lines()
        .find(|l| l.contains("route closed by the reloaded policy"))
        .unwrap_or_else(|| panic!("no line for the closed route:\n{log}"));
    assert!(line.contains("inlet-b"), "{line}");
    // Each reload logs this line at debug level as it starts, so it shows which level was
    // in force then: this one started at info.
    let rereads = || {
        relay
            .log()
            .matches("rereading the command line and config file")
            .count()
    };
    assert_eq!(rereads(), 0, "{log}");

    // An invalid level is refused with its error; the policy and the level in force stay.
    relay_admin_config(&config, &relay_addr, &state, admin, "loud", everyone);
    let err =
        postern_tests::procs::cli_fails("postern-relay", &["reload", "--config", &config_arg])
            .await;
    assert!(err.contains("log-level") && err.contains("loud"), "{err}");
    assert!(
        fresh_echo(lb).await.is_none(),
        "the refused config let inlet-b back in:\n{}",
        logs()
    );
    assert!(
        echoes(&mut a, b"after the refused reload").await,
        "the refused reload cut inlet-a"
    );
    // The refused reload started at debug (the first reload took)...
    assert_eq!(rereads(), 1, "{}", relay.log());
    assert_eq!(relay.log().matches("config reloaded").count(), 1);

    // ...and so does the next one (the refused one changed nothing); it goes back to info,
    // after which a reload starts at info again.
    relay_admin_config(
        &config,
        &relay_addr,
        &state,
        admin,
        "info",
        "role = \"echo-client\" and team = \"a\"",
    );
    let out =
        postern_tests::procs::cli("postern-relay", &["reload", "--config", &config_arg]).await;
    assert!(out.contains("log level info"), "{out}");
    assert_eq!(rereads(), 2, "{}", relay.log());
    postern_tests::procs::cli("postern-relay", &["reload", "--config", &config_arg]).await;
    assert_eq!(rereads(), 2, "{}", relay.log());
    assert_eq!(relay.log().matches("config reloaded").count(), 3);
    assert!(
        echoes(&mut a, b"after three reloads").await,
        "a reload cut inlet-a's allowed route:\n{}",
        logs()
    );
}
