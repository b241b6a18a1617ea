//! A tunnel over an impaired path, for the lossy-path tests and the bench's `lossy` scenario:
//! a relay, an outlet beside it, and an inlet that reaches it through an [`ImpairProxy`] (the
//! inlet is the node on the bad network, a laptop on hotel Wi-Fi), every node over UDP with one
//! congestion controller. Also the traffic both drive through it: a sink that counts what
//! reaches it, and a writer that fills a connection until a deadline.

use crate::impair::{ImpairProxy, Impairment};
use crate::kit::{
    bind_relay, run_relay, InletNode, InletSpec, OutletNode, OutletSpec, Pki, RelayNode,
};
use anyhow::{Context, Result};
use postern_inlet::ServiceKind;
use postern_net::transport::endpoint::Congestion;
use postern_net::transport::relay_path::{TransportMode, TransportSettings};
use postern_outlet::target::Target;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// Relay, outlet and an inlet behind an impairment proxy.
pub struct LossyPath {
    pub relay: RelayNode,
    pub proxy: ImpairProxy,
    pub outlet: OutletNode,
    pub inlet: InletNode,
}

impl LossyPath {
    /// Starts the three nodes with `congestion`, the proxy impairing as `impairment` says from
    /// the first packet (the inlet's handshakes cross it too). `services` are (name, target)
    /// pairs the outlet serves and the inlet listens for, as plain TCP.
    pub async fn start(
        pki: &Pki,
        congestion: Congestion,
        impairment: Impairment,
        seed: u64,
        services: &[(&str, SocketAddr)],
    ) -> Result<Self> {
        let relay = run_relay(bind_relay(
            pki,
            SocketAddr::from(([127, 0, 0, 1], 0)),
            [19; 32],
            None,
        )?)?;
        let proxy = ImpairProxy::start(relay.addr, seed)
            .await
            .context("start impairment proxy")?;
        proxy.set(impairment);
        let transport = TransportSettings {
            mode: TransportMode::Udp,
            congestion,
            ..TransportSettings::default()
        };
        let outlet = OutletSpec {
            transport: transport.clone(),
            ..OutletSpec::new("outlet-lossy", relay.addr)
        }
        .targets(
            services
                .iter()
                .map(|(n, a)| (*n, Target::tcp(a.to_string()))),
        )?
        .start(pki)
        .await?;
        let kinds: Vec<(&str, ServiceKind)> = services
            .iter()
            .map(|(n, _)| (*n, ServiceKind::Tcp))
            .collect();
        let inlet = InletSpec {
            transport,
            // One end-to-end connection, so one congestion controller carries everything.
            pool_size: Some(1),
            ..InletSpec::new("inlet-lossy", proxy.addr(), &kinds)
        }
        .start(pki)
        .await?;
        Ok(Self {
            relay,
            proxy,
            outlet,
            inlet,
        })
    }

    /// Stops the nodes.
    pub async fn stop(self) {
        self.inlet.running.stop().await;
        self.outlet.running.stop().await;
        self.relay.running.stop().await;
    }
}

/// A TCP server that reads every connection to its end and counts the bytes.
pub struct CountingSink {
    pub addr: SocketAddr,
    bytes: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl CountingSink {
    pub async fn start() -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let bytes = Arc::new(AtomicU64::new(0));
        let count = bytes.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let count = count.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        count.fetch_add(n as u64, Ordering::Relaxed);
                    }
                });
            }
        });
        Ok(Self { addr, bytes, task })
    }

    /// Bytes received so far, over every connection.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }
}

impl Drop for CountingSink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Writes to a new connection to `addr` until `until`, then closes it; returns the bytes
/// written.
pub async fn write_until(addr: SocketAddr, until: Instant) -> Result<u64> {
    let mut s = TcpStream::connect(addr).await?;
    let chunk = vec![0x5au8; 64 * 1024];
    let mut written = 0u64;
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        match tokio::time::timeout(left, s.write(&chunk)).await {
            Ok(Ok(n)) => written += n as u64,
            Ok(Err(e)) => return Err(e.into()),
            Err(_) => break,
        }
    }
    Ok(written)
}

/// One request/response of `size` bytes through an echo service on `s`; its round-trip time.
pub async fn echo_once(s: &mut TcpStream, size: usize, within: Duration) -> Result<Duration> {
    let msg = vec![0xa5u8; size];
    let mut back = vec![0u8; size];
    let t = Instant::now();
    tokio::time::timeout(within, async {
        s.write_all(&msg).await?;
        s.read_exact(&mut back).await?;
        anyhow::Ok(())
    })
    .await
    .context("echo timed out")??;
    Ok(t.elapsed())
}
