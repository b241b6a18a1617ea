//! Client load around a relay's death: one long echoed transfer (SHA-256 checked) and a new
//! short client connection every 20 ms, before, during and after `kill`, with what happened
//! to each. Shared by the tests of several relays and of a fleet.

use rand::RngCore;
use sha2::{Digest, Sha256};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One short echo exchange on a new client connection.
pub async fn short_exchange(addr: SocketAddr) -> Result<(), String> {
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
    tokio::time::timeout(Duration::from_secs(20), attempt)
        .await
        .unwrap_or_else(|_| Err("timed out".into()))
}

#[derive(Debug, Clone)]
pub struct Outcome {
    pub started: Instant,
    pub finished: Instant,
    pub result: Result<(), String>,
}

/// What happened around the relay's death.
#[derive(Debug)]
pub struct Report {
    /// How long `kill` took to return.
    pub kill_took: Duration,
    /// From `kill` returning to the end of the first successful client connection started
    /// after it.
    pub recovery: Duration,
    pub outcomes: Vec<Outcome>,
    /// Connections started after `kill` returned.
    pub after_kill: usize,
    /// The long transfer: Ok((bytes sent, bytes echoed, hashes equal)).
    pub long: Result<(u64, u64, bool), String>,
}

/// Runs one long echoed transfer and a loop of new client connections through `client`,
/// calls `kill` once load is flowing, and keeps the load on until connections started after
/// the kill have succeeded for `settle`.
pub async fn under_load<F: Future<Output = ()>>(
    client: SocketAddr,
    kill: F,
    settle: Duration,
) -> Report {
    let stop_writing = Arc::new(AtomicBool::new(false));
    let echoed = Arc::new(AtomicU64::new(0));
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
            // Pacing: a steady stream that outlives the relay's death, not a step order.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        w.shutdown().await.map_err(|e| e.to_string())?;
        Ok::<_, String>((sent, h.finalize().to_vec()))
    });
    let counter = echoed.clone();
    let reader = tokio::spawn(async move {
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = r.read(&mut buf).await.map_err(|e| e.to_string())?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
            counter.fetch_add(n as u64, Relaxed);
        }
        Ok::<_, String>(h.finalize().to_vec())
    });
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
                // Pacing: a new connection every 20 ms, before, during and after the death.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            while running.join_next().await.is_some() {}
        })
    };
    let snapshot =
        |o: &Arc<Mutex<Vec<Outcome>>>| o.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let deadline = Instant::now() + Duration::from_secs(20);
    while snapshot(&outcomes).len() < 20 || echoed.load(Relaxed) < 512 * 1024 {
        assert!(Instant::now() < deadline, "load did not get going");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stopping = Instant::now();
    kill.await;
    let killed = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(40);
    let recovered_at = loop {
        let done = snapshot(&outcomes);
        let first_ok_after = done
            .iter()
            .filter(|o| o.started > killed && o.result.is_ok())
            .map(|o| o.finished)
            .min();
        if let Some(t) = first_ok_after {
            if Instant::now() > t + settle {
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
    stop_writing.store(true, Relaxed);
    stop_loop.store(true, Relaxed);
    looper.await.expect("loop");
    let long = async {
        let (sent, sent_hash) = tokio::time::timeout(Duration::from_secs(30), writer)
            .await
            .map_err(|_| "writer hung".to_owned())?
            .map_err(|e| e.to_string())??;
        let got_hash = tokio::time::timeout(Duration::from_secs(30), reader)
            .await
            .map_err(|_| "reader hung".to_owned())?
            .map_err(|e| e.to_string())??;
        Ok::<_, String>((sent, echoed.load(Relaxed), sent_hash == got_hash))
    }
    .await;
    let outcomes = snapshot(&outcomes);
    Report {
        kill_took: killed - stopping,
        recovery: recovered_at.saturating_duration_since(killed),
        after_kill: outcomes.iter().filter(|o| o.started > killed).count(),
        outcomes,
        long,
    }
}

pub fn failures(report: &Report) -> Vec<&Outcome> {
    report
        .outcomes
        .iter()
        .filter(|o| o.result.is_err())
        .collect()
}
