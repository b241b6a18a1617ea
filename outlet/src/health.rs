//! Whether each service's target can serve, as the outlet tells its relays: a check every
//! `health-check-interval` (a TCP connection, or InfluxDB's `GET /ping` for an
//! `[influxdb-outlet]`), `health-check-failures` failures in a row to call the target
//! unhealthy (so one slow check does not move traffic), one success to call it healthy again.
//! Each control connection gets the states after its registration and every change after
//! that (`Ctl::ServiceHealth`); the relay then routes new connections only to outlets whose
//! target is healthy.

use crate::target::Target;
use postern_net::control::exchange::{self, CTL_TIMEOUT};
use postern_proto::msg::Ctl;
use postern_proto::name::ServiceName;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Default time between two checks of a target.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(5);
/// Default time a check may take before it counts as failed.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);
/// Default failed checks in a row before a target counts as unhealthy.
pub const DEFAULT_FAILURES: u32 = 2;

/// What a check does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// A TCP connection is made and closed (nothing is sent: no PROXY header, no TLS).
    Connect,
    /// `GET /ping` must answer 2xx (InfluxDB 1.x and 2.x answer 204); `host` is its `Host`.
    InfluxPing { host: String },
}

/// How a service's target is checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckConfig {
    pub probe: Probe,
    pub interval: Duration,
    pub timeout: Duration,
    /// Failed checks in a row to call the target unhealthy (at least 1).
    pub failures: u32,
}

impl CheckConfig {
    /// The defaults for `probe`: every 5 s, 2 s each, 2 failures in a row.
    pub fn new(probe: Probe) -> Self {
        Self {
            probe,
            interval: DEFAULT_INTERVAL,
            timeout: DEFAULT_TIMEOUT,
            failures: DEFAULT_FAILURES,
        }
    }
}

/// A target's state as the outlet reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    pub healthy: bool,
    /// Why the last check failed (empty while healthy).
    pub reason: String,
}

impl Health {
    fn up() -> Self {
        Self {
            healthy: true,
            reason: String::new(),
        }
    }
}

/// Hysteresis over check outcomes (sans-IO): `failures` failures in a row to go down, one
/// success to come back.
#[derive(Debug, Clone)]
pub struct Hysteresis {
    needed: u32,
    failed: u32,
    state: Health,
}

impl Hysteresis {
    /// Starts healthy: a target is trusted until checks say otherwise, as an outlet that does
    /// not check at all is.
    pub fn new(failures: u32) -> Self {
        Self {
            needed: failures.max(1),
            failed: 0,
            state: Health::up(),
        }
    }

    /// Takes one check's outcome; returns the new state when it changed.
    pub fn observe(&mut self, outcome: Result<(), String>) -> Option<Health> {
        match outcome {
            Ok(()) => {
                self.failed = 0;
                if self.state.healthy {
                    return None;
                }
                self.state = Health::up();
            }
            Err(reason) => {
                self.failed = self.failed.saturating_add(1);
                if !self.state.healthy || self.failed < self.needed {
                    return None;
                }
                self.state = Health {
                    healthy: false,
                    reason,
                };
            }
        }
        Some(self.state.clone())
    }
}

/// Every checked service's current state, and a signal bumped at each change.
pub struct Board {
    states: Mutex<BTreeMap<ServiceName, Health>>,
    changed: watch::Sender<u64>,
}

impl Default for Board {
    fn default() -> Self {
        Self {
            states: Mutex::default(),
            changed: watch::channel(0).0,
        }
    }
}

impl Board {
    fn states(&self) -> MutexGuard<'_, BTreeMap<ServiceName, Health>> {
        self.states.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records `service`'s new state, sets its gauge and wakes the reporters.
    pub fn set(&self, service: &ServiceName, health: Health) {
        metrics::gauge!("postern_outlet_target_healthy", "service" => service.as_str().to_owned())
            .set(if health.healthy { 1.0 } else { 0.0 });
        self.states().insert(service.clone(), health);
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Each checked service and its state, by name.
    pub fn snapshot(&self) -> Vec<(ServiceName, Health)> {
        self.states()
            .iter()
            .map(|(s, h)| (s.clone(), h.clone()))
            .collect()
    }

    /// `service`'s state (healthy when it is not checked).
    pub fn get(&self, service: &ServiceName) -> Health {
        self.states()
            .get(service)
            .cloned()
            .unwrap_or_else(Health::up)
    }
}

/// Starts one checking task per service whose target has a check; they end at `shutdown`.
pub fn spawn_checks(
    board: &Arc<Board>,
    targets: &HashMap<ServiceName, Target>,
    shutdown: &CancellationToken,
) {
    for (service, target) in targets {
        let Some(check) = target.check.clone() else {
            continue;
        };
        board.set(service, Health::up());
        let (board, service, target, stop) = (
            board.clone(),
            service.clone(),
            target.clone(),
            shutdown.clone(),
        );
        tokio::spawn(async move {
            let mut state = Hysteresis::new(check.failures);
            loop {
                // The reason travels to the relay and on to clients refused a route: it says
                // what failed, not where the private target lives (the outlet's own log does).
                let outcome = check_once(&target, &check)
                    .await
                    .map_err(|reason| redact(&reason, &target.to));
                if let Some(health) = state.observe(outcome) {
                    if health.healthy {
                        tracing::info!(%service, target = %target.to, "target answers its checks again; reporting it healthy");
                    } else {
                        tracing::warn!(%service, target = %target.to, reason = %health.reason, failures = check.failures, "target fails its checks; reporting it unhealthy");
                    }
                    board.set(&service, health);
                }
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(check.interval) => {}
                }
            }
        });
    }
}

/// `reason` without the target's address, for the relay and the clients it refuses.
fn redact(reason: &str, to: &str) -> String {
    reason.replace(to, "the target")
}

/// One check of `target`.
async fn check_once(target: &Target, check: &CheckConfig) -> Result<(), String> {
    let attempt = async {
        match &check.probe {
            Probe::Connect => target
                .connect_tcp(check.timeout)
                .await
                .map(drop)
                .map_err(|e| e.to_string()),
            Probe::InfluxPing { host } => ping(target, host).await,
        }
    };
    match tokio::time::timeout(check.timeout, attempt).await {
        Ok(r) => r,
        Err(_) => Err(format!(
            "{} did not answer the check within {:?}",
            target.to, check.timeout
        )),
    }
}

/// `GET /ping` on `target`; Ok on a 2xx status.
async fn ping(target: &Target, host: &str) -> Result<(), String> {
    let mut io = target.connect_io().await.map_err(|e| e.to_string())?;
    let req = format!("GET /ping HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    io.write_all(req.as_bytes())
        .await
        .map_err(|e| format!("GET /ping on {}: {e}", target.to))?;
    // The status line is all that is needed.
    let mut head = Vec::with_capacity(64);
    let mut buf = [0u8; 256];
    while !head.windows(2).any(|w| w == b"\r\n") && head.len() < 1024 {
        let n = io
            .read(&mut buf)
            .await
            .map_err(|e| format!("GET /ping on {}: {e}", target.to))?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&head);
    let line = line.lines().next().unwrap_or_default();
    match line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse::<u16>().ok())
    {
        Some(code) if (200..300).contains(&code) => Ok(()),
        Some(code) => Err(format!("GET /ping on {} answered {code}", target.to)),
        None => Err(format!("GET /ping on {} got no HTTP answer", target.to)),
    }
}

/// Tells the relay behind `conn` each checked service's state now (after a registration it
/// counts every service as healthy) and each change after that, until the connection closes.
/// A relay that does not know the message (an older one) is told nothing more.
pub async fn report(conn: quinn::Connection, board: Arc<Board>) {
    let mut changes = board.changed.subscribe();
    // What the relay believes: healthy, until told otherwise.
    let mut told: HashMap<ServiceName, bool> = HashMap::new();
    loop {
        changes.borrow_and_update();
        for (service, health) in board.snapshot() {
            if told.get(&service).copied().unwrap_or(true) == health.healthy {
                continue;
            }
            let msg = Ctl::ServiceHealth {
                service: service.clone(),
                healthy: health.healthy,
                reason: health.reason.clone(),
            };
            match exchange::request(&conn, &msg, CTL_TIMEOUT).await {
                Ok(Ctl::Ack) => {
                    tracing::debug!(%service, healthy = health.healthy, "health reported to the relay");
                    told.insert(service, health.healthy);
                }
                Ok(other) => {
                    tracing::info!(answer = ?other, "the relay does not take health reports (an older relay?); it routes as if every target were healthy");
                    return;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "could not report health; the relay gets it after reconnecting");
                    return;
                }
            }
        }
        tokio::select! {
            changed = changes.changed() => if changed.is_err() { return },
            _ = conn.closed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn reasons_sent_away_do_not_name_the_target() {
        let r = super::redact(
            "connect to 10.0.0.5:8086 failed: Connection refused",
            "10.0.0.5:8086",
        );
        assert_eq!(r, "connect to the target failed: Connection refused");
        assert!(!r.contains("10.0.0.5"));
    }

    use super::*;

    fn fail() -> Result<(), String> {
        Err("connect refused".into())
    }

    #[test]
    fn one_failure_does_not_flap_two_in_a_row_do() {
        let mut h = Hysteresis::new(2);
        assert_eq!(h.observe(Ok(())), None, "healthy from the start");
        assert_eq!(h.observe(fail()), None, "one slow check moves nothing");
        assert_eq!(h.observe(Ok(())), None);
        assert_eq!(
            h.observe(fail()),
            None,
            "the count starts over after a success"
        );
        let down = h.observe(fail()).expect("down after two in a row");
        assert!(!down.healthy);
        assert_eq!(down.reason, "connect refused");
        assert_eq!(h.observe(fail()), None, "still down: no new report");
        let up = h.observe(Ok(())).expect("back after one success");
        assert!(up.healthy && up.reason.is_empty());
    }

    #[test]
    fn zero_failures_means_one() {
        let mut h = Hysteresis::new(0);
        assert!(h.observe(fail()).is_some_and(|s| !s.healthy));
    }

    /// A real listener that goes away: the connect probe says so, naming the target.
    #[tokio::test]
    async fn connect_probe_sees_a_listener_go() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let target = Target::tcp(l.local_addr().expect("addr").to_string());
        let check = CheckConfig::new(Probe::Connect);
        assert_eq!(check_once(&target, &check).await, Ok(()));
        drop(l);
        let e = check_once(&target, &check).await.expect_err("gone");
        assert!(e.contains(&target.to), "{e}");
    }

    /// `/ping` answered 204 is healthy, 503 is not, silence is not.
    #[tokio::test]
    async fn ping_probe_reads_the_status() {
        for (answer, ok) in [
            (&b"HTTP/1.1 204 No Content\r\n\r\n"[..], true),
            (b"HTTP/1.1 503 Service Unavailable\r\n\r\n", false),
            (b"", false),
        ] {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let target = Target::tcp(l.local_addr().expect("addr").to_string());
            let server = tokio::spawn(async move {
                let (mut s, _) = l.accept().await.expect("accept");
                let mut buf = [0u8; 512];
                let n = s.read(&mut buf).await.expect("read");
                assert!(buf[..n].starts_with(b"GET /ping HTTP/1.1\r\n"));
                s.write_all(answer).await.expect("write");
            });
            let check = CheckConfig::new(Probe::InfluxPing { host: "db".into() });
            let got = check_once(&target, &check).await;
            assert_eq!(got.is_ok(), ok, "{got:?}");
            server.await.expect("server");
        }
    }
}
