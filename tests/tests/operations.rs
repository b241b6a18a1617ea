//! Operating postern: metrics endpoints scraped during a transfer, graceful shutdown of real
//! `postern-inlet` / `postern-outlet` processes on SIGTERM, and the audit log of real relay and
//! outlet processes.
//!
//! The process tests run the binaries next to this test executable (`target/debug`); build
//! them first with `cargo build --bins` (scripts/test.sh does).

use postern_outlet::target::Target;
use postern_tests::kit::*;
use postern_tests::ports::{free_port, free_udp_addr};
use postern_tests::procs::{bin, cli, cli_fails, write_identity, Proc, RelayCa};
use postern_tests::traffic::echo_server;
use postern_tests::wait::eventually;
use rand::{RngCore, SeedableRng};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::Command;
use tokio_util::sync::CancellationToken;

const KIB: usize = 1024;
const MIB: usize = 1024 * KIB;

// ---------------------------------------------------------------------------------------------
// Scraping

/// GETs `path` from an operations endpoint; returns (status, body).
async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr))
        .await
        .expect("connect to the metrics endpoint in time")
        .expect("connect to the metrics endpoint");
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").as_bytes())
        .await
        .expect("write request");
    let mut raw = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut raw))
        .await
        .expect("answer in time")
        .expect("read answer");
    let status = raw
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {raw:?}"));
    let body = raw
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// The value of the sample of `name` whose labels include `labels` (summed over the others).
fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut found = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (n, set) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        if n != name {
            continue;
        }
        let have: BTreeMap<&str, &str> = set
            .split(',')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k, v.trim_matches('"')))
            .collect();
        if labels.iter().all(|(k, v)| have.get(k) == Some(v)) {
            let v: f64 = value.parse().expect("sample value");
            found = Some(found.unwrap_or(0.0) + v);
        }
    }
    found
}

async fn scrape(addr: SocketAddr) -> String {
    let (status, body) = http_get(addr, "/metrics").await;
    assert_eq!(status, 200, "{body}");
    body
}

/// Starts an in-process operations endpoint for `node`.
async fn ops_endpoint(
    node: Arc<dyn postern_net::runtime::ops::Observe>,
    stop: &CancellationToken,
) -> SocketAddr {
    let listener = postern_net::runtime::ops::bind("127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("bind metrics endpoint");
    let addr = listener.local_addr().expect("addr");
    let recorder = postern_net::runtime::ops::recorder().expect("metrics recorder");
    tokio::spawn(postern_net::runtime::ops::serve(
        listener,
        node,
        Some(recorder),
        stop.clone(),
    ));
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_with_a_transfer() {
    init_logging();
    // Before any node starts, so their counters record.
    postern_net::runtime::ops::recorder().expect("metrics recorder");
    let pki = Pki::new();
    let (echo, _e) = echo_server().await;
    let relay = start_relay(&pki, "127.0.0.1:0".parse().expect("addr"), [3; 32], None);
    // A service name no other test in this process uses: the recorder is process-wide.
    let service = "ops-metrics";
    let outlet = start_outlet(
        &pki,
        "outlet-metrics",
        relay.addr,
        vec![(service, Target::tcp(echo.to_string()))],
    )
    .await;
    let inlet = start_inlet(&pki, "inlet-metrics", relay.addr, &[service]).await;
    let stop = CancellationToken::new();
    let relay_ops = ops_endpoint(Arc::new(relay.handle.clone()), &stop).await;
    let outlet_ops = ops_endpoint(Arc::new(outlet.handle.clone()), &stop).await;
    let inlet_ops = ops_endpoint(Arc::new(inlet.handle.clone()), &stop).await;

    for addr in [relay_ops, outlet_ops, inlet_ops] {
        assert_eq!(http_get(addr, "/healthz").await.0, 200);
        let (status, body) = http_get(addr, "/readyz").await;
        assert_eq!(status, 200, "{body}");
    }
    let before = scrape(relay_ops).await;
    let fwd0 = metric(&before, "postern_relay_forwarded_bytes_total", &[]).expect("relay bytes");
    assert_eq!(
        metric(&before, "postern_relay_nodes_connected", &[]),
        Some(2.0)
    );
    assert_eq!(metric(&before, "postern_relay_services", &[]), Some(1.0));

    // Send 16 MiB and read the echo; halfway through, scrape all three nodes.
    let total = 16 * MIB;
    let stream = TcpStream::connect(inlet.addr(service))
        .await
        .expect("connect inlet");
    let (mut r, mut w) = stream.into_split();
    let writer = tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * KIB];
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        for _ in 0..total / buf.len() {
            rng.fill_bytes(&mut buf);
            w.write_all(&buf).await.expect("write");
        }
        w.shutdown().await.expect("half-close");
    });
    let mut got = 0usize;
    let mut buf = vec![0u8; 256 * KIB];
    let mut checked = false;
    loop {
        let n = r.read(&mut buf).await.expect("read echo");
        if n == 0 {
            break;
        }
        got += n;
        if !checked && got >= total / 2 {
            checked = true;
            // What the client has received went client -> inlet -> relay -> outlet -> target
            // and back, so every counter on the way has moved by at least that much (less what
            // a node may not have added yet: the chunk it is writing right now).
            let slack = 256 * KIB as u64;
            let seen = got as u64;
            let relay_now = scrape(relay_ops).await;
            let outlet_now = scrape(outlet_ops).await;
            let inlet_now = scrape(inlet_ops).await;
            let fwd = metric(&relay_now, "postern_relay_forwarded_bytes_total", &[])
                .expect("relay bytes");
            assert!(
                fwd - fwd0 >= (2 * seen - slack) as f64,
                "relay forwarded {} bytes while the client got {seen} back",
                fwd - fwd0
            );
            assert!(metric(&relay_now, "postern_relay_routes", &[]) >= Some(1.0));
            for (text, node) in [(&outlet_now, "outlet"), (&inlet_now, "inlet")] {
                let name = format!("postern_{node}_stream_bytes_total");
                for direction in ["up", "down"] {
                    let v = metric(
                        text,
                        &name,
                        &[("service", service), ("direction", direction)],
                    )
                    .unwrap_or_else(|| panic!("{name} {direction} missing:\n{text}"));
                    assert!(
                        v >= (seen - slack) as f64,
                        "{name}{{direction={direction}}} = {v} while the client got {seen} back"
                    );
                }
                let open = metric(text, &format!("postern_{node}_streams_open"), &[]);
                assert_eq!(open, Some(1.0), "{node} streams open during the transfer");
            }
        }
    }
    writer.await.expect("writer");
    assert_eq!(got, total, "echoed byte count");

    // Once the stream is done, the per-service counters hold exactly the bytes sent each way.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let outlet_now = scrape(outlet_ops).await;
        let inlet_now = scrape(inlet_ops).await;
        let exact = [&outlet_now, &inlet_now]
            .iter()
            .zip(["outlet", "inlet"])
            .all(|(text, node)| {
                ["up", "down"].iter().all(|d| {
                    metric(
                        text,
                        &format!("postern_{node}_stream_bytes_total"),
                        &[("service", service), ("direction", d)],
                    ) == Some(total as f64)
                }) && metric(text, &format!("postern_{node}_streams_open"), &[]) == Some(0.0)
            });
        if exact {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "byte counters did not settle at {total}:\n{outlet_now}\n{inlet_now}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let after = scrape(relay_ops).await;
    let fwd = metric(&after, "postern_relay_forwarded_bytes_total", &[]).expect("relay bytes");
    assert!(
        fwd - fwd0 >= (2 * total) as f64,
        "relay forwarded {}",
        fwd - fwd0
    );
    assert!(
        metric(
            &after,
            "postern_relay_route_requests_total",
            &[("outcome", "granted")]
        ) >= Some(1.0)
    );
    let inlet_now = scrape(inlet_ops).await;
    assert_eq!(
        metric(
            &inlet_now,
            "postern_inlet_streams_total",
            &[("service", service)]
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(&inlet_now, "postern_inlet_relay_connected", &[]),
        Some(1.0)
    );
    stop.cancel();
}

// ---------------------------------------------------------------------------------------------
// Real processes

/// One client connection's data: deterministic, different per connection.
fn payload(i: usize, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rand::rngs::StdRng::seed_from_u64(i as u64).fill_bytes(&mut v);
    v
}

/// Opens `n` echo connections and sends the first half of each one's payload; returns them
/// once every first half has come back (so each stream is open end to end).
async fn open_streams(addr: SocketAddr, n: usize, len: usize) -> Vec<(TcpStream, Vec<u8>)> {
    let mut tasks = Vec::new();
    for i in 0..n {
        tasks.push(tokio::spawn(async move {
            let data = payload(i, len);
            let mut s = TcpStream::connect(addr).await.expect("connect");
            s.write_all(&data[..len / 2])
                .await
                .expect("write first half");
            let mut back = vec![0u8; len / 2];
            tokio::time::timeout(Duration::from_secs(30), s.read_exact(&mut back))
                .await
                .expect("first half echoed in time")
                .expect("read first half");
            assert_eq!(back, data[..len / 2], "stream {i}: first half");
            (s, data)
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.expect("stream task"));
    }
    out
}

/// Sends the second half of each payload, half-closes, and checks the whole echo.
async fn finish_streams(streams: Vec<(TcpStream, Vec<u8>)>) {
    let mut tasks = Vec::new();
    for (i, (mut s, data)) in streams.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            let half = data.len() / 2;
            s.write_all(&data[half..]).await.expect("write second half");
            s.shutdown().await.expect("half-close");
            let mut rest = Vec::new();
            tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut rest))
                .await
                .expect("rest echoed in time")
                .unwrap_or_else(|e| panic!("stream {i}: read rest: {e}"));
            assert_eq!(
                Sha256::digest(&rest),
                Sha256::digest(&data[half..]),
                "stream {i}: second half ({} of {} bytes)",
                rest.len(),
                data.len() - half
            );
        }));
    }
    for t in tasks {
        t.await.expect("stream task");
    }
}

const STREAMS: usize = 100;
const STREAM_LEN: usize = 64 * KIB;
const DRAIN: Duration = Duration::from_secs(6);

/// A connection left open past the drain deadline ends (EOF, reset or error) by then.
async fn assert_cut_off(mut straggler: TcpStream) {
    let mut buf = [0u8; 1024];
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match straggler.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(
        ended.is_ok(),
        "a stream open past the drain deadline was not closed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_the_inlet_and_exits_zero() {
    init_logging();
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new();
    let (echo, _e) = echo_server().await;
    let relay = start_relay(&pki, "127.0.0.1:0".parse().expect("addr"), [4; 32], None);
    let _outlet = start_outlet(
        &pki,
        "outlet-1",
        relay.addr,
        vec![("echo", Target::tcp(echo.to_string()))],
    )
    .await;
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let ops: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let mut args: Vec<String> = vec![
        "run".into(),
        "--relay".into(),
        relay.addr.to_string(),
        "--state-dir".into(),
        dir.path().join("inlet-state").display().to_string(),
        "--service".into(),
        format!("echo={listen}"),
        "--metrics-addr".into(),
        ops.to_string(),
        "--drain-timeout".into(),
        format!("{}s", DRAIN.as_secs()),
    ];
    args.extend(write_identity(&pki, "inlet-1", dir.path()).flags());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut inlet = Proc::spawn(dir.path(), "inlet", "postern-inlet", &args);
    inlet.wait_ready(ops).await;

    let streams = open_streams(listen, STREAMS, STREAM_LEN).await;
    let straggler = open_streams(listen, 1, 2 * KIB).await.remove(0).0;
    let body = scrape(ops).await;
    assert_eq!(
        metric(&body, "postern_inlet_streams_open", &[]),
        Some((STREAMS + 1) as f64),
        "{body}"
    );

    inlet.sigterm();
    let signalled = Instant::now();
    // Draining: not ready, and new client connections are refused.
    eventually(
        Duration::from_secs(5),
        "inlet still ready after SIGTERM",
        || async { http_get(ops, "/readyz").await.0 == 503 },
    )
    .await;
    eventually(
        Duration::from_secs(5),
        "inlet still accepts clients after SIGTERM",
        || async { TcpStream::connect(listen).await.is_err() },
    )
    .await;
    // The open streams finish well within the deadline, with every byte.
    finish_streams(streams).await;
    assert!(
        signalled.elapsed() < DRAIN,
        "streams took longer than the drain deadline"
    );
    assert_cut_off(straggler).await;
    let status = inlet.wait(DRAIN + Duration::from_secs(10)).await;
    assert!(
        status.success(),
        "inlet exit: {status}; log:\n{}",
        inlet.log()
    );
    let took = signalled.elapsed();
    assert!(
        took >= DRAIN - Duration::from_millis(500) && took < DRAIN + Duration::from_secs(5),
        "inlet exited {took:?} after SIGTERM; drain deadline {DRAIN:?}"
    );
    let log = inlet.log();
    assert!(log.contains("drain deadline passed"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_the_outlet_and_exits_zero() {
    init_logging();
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new();
    let (echo, _e) = echo_server().await;
    let relay = start_relay(&pki, "127.0.0.1:0".parse().expect("addr"), [5; 32], None);
    let ops: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let mut args: Vec<String> = vec![
        "run".into(),
        "--relay".into(),
        relay.addr.to_string(),
        "--state-dir".into(),
        dir.path().join("outlet-state").display().to_string(),
        "--service".into(),
        format!("echo={echo}"),
        "--metrics-addr".into(),
        ops.to_string(),
        "--drain-timeout".into(),
        format!("{}s", DRAIN.as_secs()),
    ];
    args.extend(write_identity(&pki, "outlet-1", dir.path()).flags());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut outlet = Proc::spawn(dir.path(), "outlet", "postern-outlet", &args);
    outlet.wait_ready(ops).await;
    let inlet = start_inlet(&pki, "inlet-1", relay.addr, &["echo"]).await;
    let addr = inlet.addr("echo");

    let streams = open_streams(addr, STREAMS, STREAM_LEN).await;
    let straggler = open_streams(addr, 1, 2 * KIB).await.remove(0).0;
    let body = scrape(ops).await;
    assert_eq!(
        metric(&body, "postern_outlet_streams_open", &[]),
        Some((STREAMS + 1) as f64),
        "{body}"
    );

    outlet.sigterm();
    let signalled = Instant::now();
    eventually(
        Duration::from_secs(5),
        "outlet still ready after SIGTERM",
        || async { http_get(ops, "/readyz").await.0 == 503 },
    )
    .await;
    // A new stream is refused by the draining outlet: the client gets no echo. The refusal
    // can be so quick that the inlet's reset arrives before `connect` returns: that is the
    // same outcome.
    match TcpStream::connect(addr).await {
        Ok(mut late) => {
            let _ = late.write_all(b"too late").await;
            let mut buf = [0u8; 16];
            let n = tokio::time::timeout(Duration::from_secs(10), late.read(&mut buf))
                .await
                .expect("late stream answered in time")
                .unwrap_or(0);
            assert_eq!(n, 0, "a stream opened while draining was served");
        }
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("connect inlet: {e}"),
    }
    let body = scrape(ops).await;
    assert!(
        metric(
            &body,
            "postern_outlet_stream_refusals_total",
            &[("reason", "draining")]
        ) >= Some(1.0),
        "{body}"
    );

    finish_streams(streams).await;
    assert!(
        signalled.elapsed() < DRAIN,
        "streams took longer than the drain deadline"
    );
    assert_cut_off(straggler).await;
    let status = outlet.wait(DRAIN + Duration::from_secs(10)).await;
    assert!(
        status.success(),
        "outlet exit: {status}; log:\n{}",
        outlet.log()
    );
    let took = signalled.elapsed();
    assert!(
        took >= DRAIN - Duration::from_millis(500) && took < DRAIN + Duration::from_secs(5),
        "outlet exited {took:?} after SIGTERM; drain deadline {DRAIN:?}"
    );
}

fn audit_lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("audit line {l:?}: {e}")))
        .collect()
}

fn has(lines: &[serde_json::Value], want: &[(&str, serde_json::Value)]) -> bool {
    lines
        .iter()
        .any(|l| want.iter().all(|(k, v)| l.get(*k) == Some(v)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_logs_record_decisions_and_no_secret() {
    use serde_json::json;
    init_logging();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = |p: &str| dir.path().join(p).display().to_string();
    let state = path("relay-state");
    let relay_addr = free_udp_addr().to_string();
    let relay_ca = RelayCa::init(&state, &relay_addr).await;
    let outlet_ticket = relay_ca.ticket("echo-outlet").await;
    let client_ticket = relay_ca.ticket("echo-client").await;
    let intruder_ticket = relay_ca.ticket("intruder").await;

    let relay_audit = dir.path().join("relay-audit.jsonl");
    let relay_ops = format!("127.0.0.1:{}", free_port());
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
            "--allow-route",
            "echo=role = \"echo-client\"",
            "--audit-log",
            &relay_audit.display().to_string(),
            "--metrics-addr",
            &relay_ops,
            "--drain-timeout",
            "1s",
        ],
    );
    relay.wait_ready(relay_ops.parse().expect("addr")).await;

    let (echo, _e) = echo_server().await;
    let outlet_audit = dir.path().join("outlet-audit.jsonl");
    let outlet_ops = format!("127.0.0.1:{}", free_port());
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
            &format!("echo={echo},allow=role = \"echo-client\""),
            "--audit-log",
            &outlet_audit.display().to_string(),
            "--metrics-addr",
            &outlet_ops,
            "--drain-timeout",
            "1s",
        ],
    );
    outlet.wait_ready(outlet_ops.parse().expect("addr")).await;

    let mut inlets = Vec::new();
    for (name, ticket) in [
        ("inlet-good", &client_ticket),
        ("inlet-intruder", &intruder_ticket),
    ] {
        let listen = format!("127.0.0.1:{}", free_port());
        let ops = format!("127.0.0.1:{}", free_port());
        let mut p = Proc::spawn(
            dir.path(),
            name,
            "postern-inlet",
            &[
                "run",
                "--ticket",
                ticket,
                "--name",
                name,
                "--state-dir",
                &path(&format!("{name}-state")),
                "--service",
                &format!("echo={listen}"),
                "--metrics-addr",
                &ops,
                "--drain-timeout",
                "1s",
            ],
        );
        p.wait_ready(ops.parse().expect("addr")).await;
        inlets.push((p, listen.parse::<SocketAddr>().expect("addr")));
    }

    // The allowed inlet gets its echo; the intruder's connection is closed without one.
    let mut s = TcpStream::connect(inlets[0].1).await.expect("connect");
    s.write_all(b"hello").await.expect("write");
    s.shutdown().await.expect("half-close");
    let mut back = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut back))
        .await
        .expect("echo in time")
        .expect("echo");
    assert_eq!(back, b"hello");
    // The intruder's inlet may reset the connection before the connect has even completed
    // here (it is refused at once); either way no byte may come back.
    let mut back = Vec::new();
    match TcpStream::connect(inlets[1].1).await {
        Ok(mut s) => {
            let _ = s.write_all(b"hello").await;
            let _ = tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut back)).await;
        }
        Err(e) => assert_eq!(
            e.kind(),
            std::io::ErrorKind::ConnectionReset,
            "connecting to the intruder's inlet: {e}"
        ),
    }
    assert!(back.is_empty(), "the intruder got an answer");

    // A used ticket is refused, and that is audited too.
    let refused = Command::new(bin("postern-inlet"))
        .args([
            "enroll",
            &client_ticket,
            "--name",
            "inlet-again",
            "--state-dir",
            &path("again-state"),
        ])
        .output()
        .await
        .expect("run enroll");
    assert!(!refused.status.success(), "a used ticket enrolled again");

    let relay_lines = audit_lines(&relay_audit);
    let outlet_lines = audit_lines(&outlet_audit);
    let dump = || {
        format!(
            "relay audit:\n{}\noutlet audit:\n{}",
            std::fs::read_to_string(&relay_audit).unwrap_or_default(),
            std::fs::read_to_string(&outlet_audit).unwrap_or_default()
        )
    };
    for node in ["outlet-a", "inlet-good", "inlet-intruder"] {
        assert!(
            has(
                &relay_lines,
                &[
                    ("event", json!("enrollment")),
                    ("allowed", json!(true)),
                    ("node", json!(node))
                ]
            ),
            "no enrollment of {node}: {}",
            dump()
        );
    }
    assert!(
        has(
            &relay_lines,
            &[("event", json!("enrollment")), ("allowed", json!(false))]
        ),
        "no refused enrollment: {}",
        dump()
    );
    let decision = |action: &str, node: &str, allowed: bool| {
        vec![
            ("target", json!("postern::audit")),
            ("event", json!("policy")),
            ("action", json!(action)),
            ("node", json!(node)),
            ("service", json!("echo")),
            ("allowed", json!(allowed)),
        ]
    };
    assert!(
        has(&relay_lines, &decision("register", "outlet-a", true)),
        "{}",
        dump()
    );
    assert!(
        has(&relay_lines, &decision("route", "inlet-good", true)),
        "{}",
        dump()
    );
    assert!(
        has(&relay_lines, &decision("route", "inlet-intruder", false)),
        "{}",
        dump()
    );
    assert!(
        has(&outlet_lines, &decision("use", "inlet-good", true)),
        "{}",
        dump()
    );
    assert!(
        relay_lines
            .iter()
            .chain(&outlet_lines)
            .filter(|l| l["event"] == "policy")
            .all(|l| l["rule"].is_string()),
        "every decision names its rule: {}",
        dump()
    );

    // No secret: neither a ticket (nor its one-time secret) nor any key material.
    let text = dump();
    for t in [&outlet_ticket, &client_ticket, &intruder_ticket] {
        let secret = postern_proto::ticket::Ticket::decode(t)
            .expect("decode ticket")
            .secret;
        assert!(!text.contains(t.as_str()), "a ticket is in the audit log");
        assert!(
            !text.contains(&secret),
            "a ticket secret is in the audit log"
        );
    }
    assert!(
        !text.contains("PRIVATE KEY") && !text.contains("BEGIN"),
        "{text}"
    );

    // Every binary stops on SIGTERM with status 0.
    for (p, _) in &mut inlets {
        p.sigterm();
        let status = p.wait(Duration::from_secs(15)).await;
        assert!(status.success(), "{}: {status}\n{}", p.name, p.log());
    }
    for p in [&mut outlet, &mut relay] {
        p.sigterm();
        let status = p.wait(Duration::from_secs(15)).await;
        assert!(status.success(), "{}: {status}\n{}", p.name, p.log());
    }
}

/// A one-request HTTP server answering `ok from the web app`, keeping each request head.
async fn head_recorder() -> (SocketAddr, Arc<std::sync::Mutex<Vec<String>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let heads = Arc::new(std::sync::Mutex::new(Vec::new()));
    let h = heads.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let h = h.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                h.lock()
                    .expect("heads")
                    .push(String::from_utf8_lossy(&head).into_owned());
                let body = "ok from the web app";
                let resp = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    (addr, heads)
}

/// The public hostname path with the real binaries: `postern-relay run --public-addr
/// --public-domain`, an outlet config with `public = true`, and `postern-outlet access
/// create|list|revoke` against the running outlet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_hostname_with_access_links_from_the_command_line() {
    init_logging();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = |p: &str| dir.path().join(p).display().to_string();
    let state = path("relay-state");
    let certs = path("certs");
    cli("postern-relay", &["ca", "init", "--state-dir", &state]).await;
    for name in ["outlet-1", "web.pub.localhost"] {
        let args = [
            "ca",
            "issue",
            name,
            "--state-dir",
            &state,
            "--out-dir",
            &certs,
        ];
        cli("postern-relay", &args).await;
    }
    let relay_addr = free_udp_addr().to_string();
    let public_port = free_port();
    let public = format!("127.0.0.1:{public_port}");
    let relay_ops = format!("127.0.0.1:{}", free_port());
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
            "web=name = \"outlet-1\"",
            "--public-addr",
            &public,
            "--public-domain",
            "pub.localhost",
            "--metrics-addr",
            &relay_ops,
        ],
    );
    relay.wait_ready(relay_ops.parse().expect("addr")).await;

    let (web, heads) = head_recorder().await;
    let outlet_state = path("outlet-state");
    let config = dir.path().join("outlet.toml");
    std::fs::write(
        &config,
        format!(
            r#"relay = "{relay_addr}"
cert = "{certs}/outlet-1.pem"
key = "{certs}/outlet-1.key"
ca = "{certs}/ca.pem"
state-dir = "{outlet_state}"
public-domain = "pub.localhost"
public-port = {public_port}
[[service]]
name = "web"
to = "{web}"
public = true
public-cert = "{certs}/web.pub.localhost.pem"
public-key = "{certs}/web.pub.localhost.key"
"#
        ),
    )
    .expect("write outlet.toml");
    let outlet_ops = format!("127.0.0.1:{}", free_port());
    let mut outlet = Proc::spawn(
        dir.path(),
        "outlet",
        "postern-outlet",
        &[
            "run",
            "--config",
            &config.display().to_string(),
            "--metrics-addr",
            &outlet_ops,
        ],
    );
    outlet.wait_ready(outlet_ops.parse().expect("addr")).await;

    let ca = std::fs::read(dir.path().join("certs/ca.pem")).expect("ca.pem");
    let client = reqwest::Client::builder()
        .no_proxy()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&ca).expect("CA"))
        .resolve("web.pub.localhost", public.parse().expect("addr"))
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client");
    let root = format!("https://web.pub.localhost:{public_port}/");
    // The outlet registers its public service right after connecting; until then (and without
    // a grant) nothing gets through.
    let mut status = 0;
    let deadline = Instant::now() + Duration::from_secs(20);
    while status != 403 {
        assert!(
            Instant::now() < deadline,
            "no 403 page: {status}\n{}\n{}",
            relay.log(),
            outlet.log()
        );
        status = match client.get(&root).send().await {
            Ok(r) => r.status().as_u16(),
            Err(_) => 0,
        };
        if status != 403 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    let created = cli(
        "postern-outlet",
        &[
            "access",
            "create",
            "--service",
            "web",
            "--ttl",
            "10m",
            "--attr",
            "team=ops",
            "--state-dir",
            &outlet_state,
        ],
    )
    .await;
    let field = |name: &str| {
        created
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_owned())
            .unwrap_or_else(|| panic!("no {name} in {created}"))
    };
    let (link, id) = (field("link:"), field("grant:"));
    assert!(
        link.starts_with(&format!("{root}_postern/access?grant=")),
        "{link}"
    );
    let r = client.get(&link).send().await.expect("open link");
    assert_eq!(r.status().as_u16(), 302);
    let cookie = r
        .headers()
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .expect("cookie")
        .to_owned();
    let r = client
        .get(&root)
        .header("Cookie", &cookie)
        .send()
        .await
        .expect("with cookie");
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(r.text().await.expect("body"), "ok from the web app");
    assert_eq!(heads.lock().expect("heads").len(), 1);

    let listed = cli(
        "postern-outlet",
        &["access", "list", "--state-dir", &outlet_state],
    )
    .await;
    assert!(
        listed.contains(&id) && listed.contains("team=ops") && listed.contains("active"),
        "{listed}"
    );
    let secret = link.split("grant=").nth(1).expect("secret");
    assert!(
        !listed.contains(secret),
        "the list shows the grant's secret"
    );
    cli(
        "postern-outlet",
        &["access", "revoke", &id, "--state-dir", &outlet_state],
    )
    .await;
    let r = client
        .get(&root)
        .header("Cookie", &cookie)
        .send()
        .await
        .expect("after revoke");
    assert_eq!(r.status().as_u16(), 403);
    assert_eq!(heads.lock().expect("heads").len(), 1);
    // A service the outlet does not offer publicly gets no link.
    let out = Command::new(bin("postern-outlet"))
        .args([
            "access",
            "create",
            "--service",
            "other",
            "--state-dir",
            &outlet_state,
        ])
        .output()
        .await
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("not offered publicly"));
    // The secret never reaches the logs.
    for log in [relay.log(), outlet.log()] {
        assert!(!log.contains(secret), "a log holds the grant's secret");
    }
    outlet.sigterm();
    relay.sigterm();
    outlet.wait(Duration::from_secs(20)).await;
    relay.wait(Duration::from_secs(20)).await;
}

/// The usual mistakes of a new operator, each answered with its cause and the next step:
/// revoking in a directory that is not the relay's, enrolling an enrolled directory again,
/// starting a second inlet on one identity; and a revocation that goes to the running relay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_mistakes_are_explained() {
    init_logging();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = |p: &str| dir.path().join(p).display().to_string();
    let state = path("relay-state");
    let relay_addr = free_udp_addr().to_string();
    let relay_ca = RelayCa::init(&state, &relay_addr).await;
    let first_ticket = relay_ca.ticket("client").await;
    let second_ticket = relay_ca.ticket("client").await;

    // Revoking in a directory without the CA is an error, and makes no directory.
    let elsewhere = path("relay-state-typo");
    let err = cli_fails(
        "postern-relay",
        &["identity", "revoke", "laptop", "--state-dir", &elsewhere],
    )
    .await;
    assert!(
        err.contains("holds no project CA") && err.contains("nothing was revoked"),
        "{err}"
    );
    assert!(!Path::new(&elsewhere).exists(), "revoke made {elsewhere}");

    let admin_addr = format!("127.0.0.1:{}", free_port());
    let relay_ops = format!("127.0.0.1:{}", free_port());
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
            "--admin-addr",
            &admin_addr,
            "--metrics-addr",
            &relay_ops,
            "--drain-timeout",
            "1s",
        ],
    );
    relay.wait_ready(relay_ops.parse().expect("addr")).await;

    let inlet_state = path("inlet-state");
    let inlet_args = |ops: &str, listen: &str| -> Vec<String> {
        [
            "run",
            "--ticket",
            &first_ticket,
            "--name",
            "inlet-a",
            "--state-dir",
            &inlet_state,
            "--service",
            &format!("echo={listen}"),
            "--metrics-addr",
            ops,
            "--drain-timeout",
            "1s",
        ]
        .map(str::to_owned)
        .to_vec()
    };
    let ops = format!("127.0.0.1:{}", free_port());
    let args = inlet_args(&ops, &format!("127.0.0.1:{}", free_port()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut inlet = Proc::spawn(dir.path(), "inlet", "postern-inlet", &args);
    inlet.wait_ready(ops.parse().expect("addr")).await;

    // Enrolling the enrolled directory again says as whom, and leaves the ticket unused.
    let err = cli_fails(
        "postern-inlet",
        &["enroll", &second_ticket, "--state-dir", &inlet_state],
    )
    .await;
    assert!(
        err.contains("already enrolled as inlet-a") && err.contains("To enroll again"),
        "{err}"
    );

    // A second inlet on the same identity is refused, naming the first one's pid.
    let ops2 = format!("127.0.0.1:{}", free_port());
    let args = inlet_args(&ops2, &format!("127.0.0.1:{}", free_port()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut second = Proc::spawn(dir.path(), "inlet-second", "postern-inlet", &args);
    let status = second.wait(Duration::from_secs(20)).await;
    assert!(!status.success(), "the second inlet ran");
    let pid = inlet.child.id().expect("first inlet runs");
    let log = second.log();
    assert!(
        log.contains(&format!("in use by another postern-inlet (pid {pid})")),
        "{log}"
    );
    inlet.wait_ready(ops.parse().expect("addr")).await;

    // With the relay running, the revocation goes to it and says so.
    let out = cli(
        "postern-relay",
        &[
            "identity",
            "revoke",
            "inlet-a",
            "--state-dir",
            &state,
            "--admin-addr",
            &admin_addr,
        ],
    )
    .await;
    assert!(
        out.contains(&format!("at the running relay (admin API {admin_addr}"))
            && out.contains("cut off"),
        "{out}"
    );
    let listed = cli(
        "postern-relay",
        &["identity", "list", "--state-dir", &state],
    )
    .await;
    assert!(
        listed
            .lines()
            .any(|l| l.starts_with("inlet-a") && l.contains("REVOKED")),
        "{listed}"
    );

    // A second relay on the running one's port is refused, naming the process that holds it.
    let state2 = path("relay-state-2");
    let _ca2 = RelayCa::init(&state2, &relay_addr).await;
    let admin2 = format!("127.0.0.1:{}", free_port());
    let mut second_relay = Proc::spawn(
        dir.path(),
        "relay-second",
        "postern-relay",
        &[
            "run",
            "--state-dir",
            &state2,
            "--listen",
            &relay_addr,
            "--admin-addr",
            &admin2,
        ],
    );
    let status = second_relay.wait(Duration::from_secs(20)).await;
    assert!(!status.success(), "the second relay ran");
    let relay_pid = relay.child.id().expect("first relay runs");
    let log = second_relay.log();
    assert!(
        log.contains("address already in use")
            && log.contains(&format!("postern-relay (pid {relay_pid})")),
        "{log}"
    );
}
