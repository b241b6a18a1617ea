//! Several relays: an outlet registers with each, an inlet uses one and, when it dies, moves
//! its end-to-end connection to another relay's path (QUIC migration) so that open client
//! connections survive and new ones keep working.

use postern_inlet::ServiceKind;
use postern_net::relay_path::TransportSettings;
use postern_outlet::target::Target;
use postern_tests::harness::*;
use rand::RngCore;
use sha2::{Digest, Sha256};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One short echo exchange on a new client connection.
async fn short_exchange(addr: SocketAddr) -> Result<(), String> {
    let attempt = async {
        let mut s = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let mut msg = [0u8; 2048];
        rand::rng().fill_bytes(&mut msg);
        s.write_all(&msg).await.map_err(|e| e.to_string())?;
        s.shutdown().await.map_err(|e| e.to_string())?;
        let mut back = Vec::new();
        s.read_to_end(&mut back).await.map_err(|e| e.to_string())?;
        if back[..] == msg[..] {
            Ok(())
        } else {
            Err(format!("echo mismatch ({} bytes back)", back.len()))
        }
    };
    tokio::time::timeout(Duration::from_secs(15), attempt)
        .await
        .unwrap_or_else(|_| Err("timed out".into()))
}

#[derive(Debug, Clone)]
struct Outcome {
    started: Instant,
    finished: Instant,
    result: Result<(), String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inlet_moves_to_another_relay_when_its_relay_dies_under_load() {
    init_logging();
    let (echo, _task) = echo_server().await;
    let pki = Pki::new();
    let relays: Vec<RelayNode> = (0..3)
        .map(|i| {
            start_relay(
                &pki,
                "127.0.0.1:0".parse().expect("addr"),
                [10 + i; 32],
                None,
            )
        })
        .collect();
    let addrs: Vec<SocketAddr> = relays.iter().map(|r| r.addr).collect();
    let _outlet = start_outlet_via(
        &pki,
        "outlet-ha",
        &addrs,
        vec![("echo", Target::tcp(echo.to_string()))],
        TransportSettings::default(),
    )
    .await;
    for r in &relays {
        assert_eq!(r.handle.services().len(), 1, "registered with every relay");
    }
    let inlet = start_inlet_via(
        &pki,
        "inlet-ha",
        &addrs,
        &[("echo", ServiceKind::Tcp)],
        TransportSettings::default(),
    )
    .await;
    let client = inlet.addr("echo");
    short_exchange(client).await.expect("first exchange");
    let mut relays = relays.into_iter();
    let first = relays.next().expect("relay 1");
    let others: Vec<RelayNode> = relays.collect();
    assert_eq!(
        first.handle.routes().len(),
        1,
        "the inlet uses the first relay"
    );

    // Load: one long transfer (a steady stream echoed back) and a loop of new connections.
    let stop_writing = Arc::new(AtomicBool::new(false));
    let echoed = Arc::new(AtomicU64::new(0));
    let long = {
        let stream = TcpStream::connect(client).await.expect("connect");
        let (mut r, mut w) = stream.into_split();
        let stop = stop_writing.clone();
        let writer = tokio::spawn(async move {
            let mut h = Sha256::new();
            let mut buf = vec![0u8; 32 * 1024];
            let mut sent = 0u64;
            while !stop.load(Relaxed) {
                rand::rng().fill_bytes(&mut buf);
                h.update(&buf);
                w.write_all(&buf).await.map_err(|e| e.to_string())?;
                sent += buf.len() as u64;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            w.shutdown().await.map_err(|e| e.to_string())?;
            Ok::<_, String>((sent, h.finalize().to_vec()))
        });
        let echoed = echoed.clone();
        let reader = tokio::spawn(async move {
            let mut h = Sha256::new();
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = r.read(&mut buf).await.map_err(|e| e.to_string())?;
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
                echoed.fetch_add(n as u64, Relaxed);
            }
            Ok::<_, String>(h.finalize().to_vec())
        });
        (writer, reader)
    };
    let outcomes: Arc<Mutex<Vec<Outcome>>> = Arc::default();
    let stop_loop = Arc::new(AtomicBool::new(false));
    let looper = {
        let (outcomes, stop) = (outcomes.clone(), stop_loop.clone());
        tokio::spawn(async move {
            let mut running = tokio::task::JoinSet::new();
            while !stop.load(Relaxed) {
                let outcomes = outcomes.clone();
                running.spawn(async move {
                    let started = Instant::now();
                    let result = short_exchange(client).await;
                    let o = Outcome {
                        started,
                        finished: Instant::now(),
                        result,
                    };
                    outcomes.lock().unwrap_or_else(|p| p.into_inner()).push(o);
                });
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            while running.join_next().await.is_some() {}
        })
    };
    // Let load build up, then kill the inlet's relay.
    let deadline = Instant::now() + Duration::from_secs(20);
    while outcomes.lock().expect("lock").len() < 20 || echoed.load(Relaxed) < 512 * 1024 {
        assert!(Instant::now() < deadline, "load did not get going");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let killed = Instant::now();
    first.running.stop().await;

    // Keep the load on until connections started well after the kill have succeeded for a
    // while: the first success started after the kill marks the recovery.
    let deadline = Instant::now() + Duration::from_secs(30);
    let recovered_at = loop {
        let done = outcomes.lock().expect("lock").clone();
        let first_ok_after = done
            .iter()
            .filter(|o| o.started > killed && o.result.is_ok())
            .map(|o| o.finished)
            .min();
        if let Some(t) = first_ok_after {
            if Instant::now() > t + Duration::from_secs(3) {
                break t;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no connection succeeded after the relay died: {:?}",
            done.iter()
                .filter(|o| o.started > killed)
                .take(5)
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let echoed_before_stop = echoed.load(Relaxed);
    stop_writing.store(true, Relaxed);
    stop_loop.store(true, Relaxed);
    looper.await.expect("loop");
    let done = outcomes.lock().expect("lock").clone();
    let failures: Vec<&Outcome> = done.iter().filter(|o| o.result.is_err()).collect();
    let after_kill = done.iter().filter(|o| o.started > killed).count();
    println!(
        "connections: {} in all, {} started after the kill, {} failed; recovery (kill to the \
         first success of a connection started after it): {:?}; long transfer echoed {} bytes \
         before it was stopped",
        done.len(),
        after_kill,
        failures.len(),
        recovered_at - killed,
        echoed_before_stop
    );
    assert!(after_kill >= 20, "the load went on after the kill");
    assert!(
        failures.is_empty(),
        "client connections failed: {:?}",
        failures.iter().take(5).collect::<Vec<_>>()
    );

    // The long transfer survived: everything sent came back intact after the move.
    let (writer, reader) = long;
    let (sent, sent_hash) = tokio::time::timeout(Duration::from_secs(30), writer)
        .await
        .expect("writer finished")
        .expect("join")
        .expect("long transfer kept writing across the move");
    let got_hash = tokio::time::timeout(Duration::from_secs(30), reader)
        .await
        .expect("reader finished")
        .expect("join")
        .expect("long transfer kept reading across the move");
    assert_eq!(echoed.load(Relaxed), sent, "every byte came back");
    assert_eq!(got_hash, sent_hash, "and intact");
    assert!(
        inlet.handle.migrations() >= 1,
        "the connection migrated instead of being replaced"
    );
    let routes_elsewhere: usize = others.iter().map(|r| r.handle.routes().len()).sum();
    assert!(
        routes_elsewhere >= 1,
        "the traffic now goes through another relay"
    );
}
