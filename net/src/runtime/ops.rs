//! The operations endpoint every node serves on `--metrics-addr`: `/metrics` (Prometheus text),
//! `/healthz` (the process is alive) and `/readyz` (the node can do its job).
//!
//! Metrics come from two places, both rendered at scrape time:
//! - the node's own counters (atomics it keeps anyway, such as the relay's forwarding stats),
//!   written by its [`Observe`] implementation, so that several nodes in one process (tests,
//!   the bench) each report their own;
//! - the process-wide `metrics` recorder (per-service byte counters, lease counters), installed
//!   once per process with [`recorder`].
//!
//! The HTTP side is deliberately tiny: one GET per connection, bounded head, a timeout on every
//! read and write, and a cap on concurrent connections.

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// What a node tells its operations endpoint.
pub trait Observe: Send + Sync + 'static {
    /// Writes the node's own metrics (see [`Exposition`]).
    fn render(&self, out: &mut Exposition);
    /// `Ok` when the node can serve, otherwise why not (shown by `/readyz`).
    fn ready(&self) -> Result<(), String>;
    /// What `/readyz` adds after `ready` when the node is ready (e.g. which transport reaches
    /// the relay).
    fn ready_detail(&self) -> Option<String> {
        None
    }
}

/// The process-wide Prometheus recorder behind the `metrics` macros, installed by the first
/// call (later calls return the same handle). Call it early, before nodes start: counters taken
/// before it do not record. Fails if some other recorder was installed.
pub fn recorder() -> Result<PrometheusHandle, String> {
    static HANDLE: OnceLock<Result<PrometheusHandle, String>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            PrometheusBuilder::new()
                .install_recorder()
                .map_err(|e| format!("cannot install the metrics recorder: {e}"))
        })
        .clone()
}

/// Prometheus text exposition (format 0.0.4) being written.
#[derive(Debug, Default)]
pub struct Exposition {
    out: String,
}

/// A metric family's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
}

impl Exposition {
    /// Starts a family: its `# HELP` and `# TYPE` lines.
    pub fn family(&mut self, name: &str, help: &str, kind: Kind) -> &mut Self {
        let kind = match kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
        };
        let help = help.replace('\\', "\\\\").replace('\n', "\\n");
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
        self
    }

    /// One sample of the current family.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) -> &mut Self {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let v = v
                    .replace('\\', "\\\\")
                    .replace('"', "\\\"")
                    .replace('\n', "\\n");
                let _ = write!(self.out, "{k}=\"{v}\"");
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
        self
    }

    /// A family with one unlabelled counter sample.
    pub fn counter(&mut self, name: &str, help: &str, value: u64) -> &mut Self {
        self.family(name, help, Kind::Counter)
            .sample(name, &[], value as f64)
    }

    /// A family with one unlabelled gauge sample.
    pub fn gauge(&mut self, name: &str, help: &str, value: f64) -> &mut Self {
        self.family(name, help, Kind::Gauge)
            .sample(name, &[], value)
    }

    /// The text so far.
    pub fn into_string(self) -> String {
        self.out
    }
}

/// Renders a node's metrics followed by the process recorder's.
pub fn render(node: &dyn Observe, recorder: Option<&PrometheusHandle>) -> String {
    let mut exp = Exposition::default();
    node.render(&mut exp);
    let mut text = exp.into_string();
    if let Some(r) = recorder {
        r.run_upkeep();
        text.push_str(&r.render());
    }
    text
}

/// Why the operations endpoint could not start.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr} for metrics and health checks: {source}")]
pub struct OpsBindError {
    pub addr: SocketAddr,
    pub source: std::io::Error,
}

/// Binds the endpoint's TCP listener.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, OpsBindError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| OpsBindError { addr, source })
}

/// Longest request head accepted.
const MAX_HEAD: usize = 8 * 1024;
/// Time a client has to send its request, and to take the answer.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 32;

/// The next connection on `listener`, taken only while fewer than `limit`'s permits are out
/// (the permit travels with the connection); `None` once `shutdown` is cancelled. Accept errors
/// (e.g. out of file descriptors) are logged and retried after a short pause.
pub async fn accept_bounded(
    listener: &TcpListener,
    limit: &Arc<tokio::sync::Semaphore>,
    shutdown: &CancellationToken,
    what: &str,
) -> Option<(TcpStream, SocketAddr, tokio::sync::OwnedSemaphorePermit)> {
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => return None,
            p = limit.clone().acquire_owned() => p.ok()?,
        };
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return None,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((tcp, peer)) => return Some((tcp, peer, permit)),
            Err(e) => {
                tracing::debug!(error = %e, "{what} accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Serves the endpoint on `addr` when one is given, until `stop`. Binds before returning, so
/// a port that is taken fails start-up instead of a background task.
pub async fn serve_if_asked(
    addr: Option<std::net::SocketAddr>,
    node: Arc<dyn Observe>,
    recorder: Option<PrometheusHandle>,
    stop: CancellationToken,
) -> Result<(), OpsBindError> {
    if let Some(addr) = addr {
        let listener = bind(addr).await?;
        tokio::spawn(serve(listener, node, recorder, stop));
    }
    Ok(())
}

/// The metrics recorder when the endpoint is asked for (`addr` given), with the component's
/// metrics described by `describe`; `None` otherwise, so nothing is recorded for no reader.
pub fn recorder_if_asked(
    addr: Option<std::net::SocketAddr>,
    describe: fn(),
) -> Result<Option<PrometheusHandle>, String> {
    if addr.is_none() {
        return Ok(None);
    }
    let r = recorder()?;
    describe();
    Ok(Some(r))
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    node: Arc<dyn Observe>,
    recorder: Option<PrometheusHandle>,
    shutdown: CancellationToken,
) {
    tracing::info!(addr = %crate::runtime::logging::local_addr(listener.local_addr()), "serving /metrics, /healthz and /readyz");
    let limit = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    while let Some((tcp, _, permit)) =
        accept_bounded(&listener, &limit, &shutdown, "metrics endpoint").await
    {
        let node = node.clone();
        let recorder = recorder.clone();
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(e) = answer(tcp, node.as_ref(), recorder.as_ref()).await {
                tracing::debug!(error = %e, "metrics endpoint request failed");
            }
        });
    }
}

/// A parsed request line.
#[derive(Debug, PartialEq, Eq)]
struct Request {
    head_only: bool,
    path: String,
}

/// Parses the request line of a head; `Err` carries the status to answer.
fn parse_request(head: &[u8]) -> Result<Request, (u16, &'static str)> {
    let line_end = head
        .windows(2)
        .position(|w| w == b"\r\n")
        .ok_or((400, "Bad Request"))?;
    let line = std::str::from_utf8(&head[..line_end]).map_err(|_| (400, "Bad Request"))?;
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err((400, "Bad Request"));
    };
    if !version.starts_with("HTTP/1.") {
        return Err((400, "Bad Request"));
    }
    let head_only = match method {
        "GET" => false,
        "HEAD" => true,
        _ => return Err((405, "Method Not Allowed")),
    };
    let path = target.split('?').next().unwrap_or_default().to_owned();
    Ok(Request { head_only, path })
}

async fn answer(
    mut tcp: TcpStream,
    node: &dyn Observe,
    recorder: Option<&PrometheusHandle>,
) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let read = async {
        let mut buf = [0u8; 1024];
        loop {
            let n = tcp.read(&mut buf).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            head.extend_from_slice(&buf[..n]);
            if head.windows(4).any(|w| w == b"\r\n\r\n") {
                return Ok(());
            }
            if head.len() > MAX_HEAD {
                return Err(std::io::Error::other("request head too long"));
            }
        }
    };
    let (status, reason, content_type, body, head_only) =
        match tokio::time::timeout(IO_TIMEOUT, read).await {
            Err(_) => return Err(std::io::ErrorKind::TimedOut.into()),
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Ok(Err(_)) => (
                431,
                "Request Header Fields Too Large",
                TEXT,
                String::new(),
                false,
            ),
            Ok(Ok(())) => match parse_request(&head) {
                Err((status, reason)) => (status, reason, TEXT, format!("{reason}\n"), false),
                Ok(req) => {
                    let (status, reason, ct, body) = route(&req.path, node, recorder);
                    (status, reason, ct, body, req.head_only)
                }
            },
        };
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if !head_only {
        out.push_str(&body);
    }
    tokio::time::timeout(IO_TIMEOUT, async {
        tcp.write_all(out.as_bytes()).await?;
        tcp.shutdown().await
    })
    .await
    .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))?
}

const TEXT: &str = "text/plain; charset=utf-8";
const PROMETHEUS: &str = "text/plain; version=0.0.4; charset=utf-8";

fn route(
    path: &str,
    node: &dyn Observe,
    recorder: Option<&PrometheusHandle>,
) -> (u16, &'static str, &'static str, String) {
    match path {
        "/metrics" => (200, "OK", PROMETHEUS, render(node, recorder)),
        "/healthz" => (200, "OK", TEXT, "ok\n".into()),
        "/readyz" => match node.ready() {
            Ok(()) => match node.ready_detail() {
                Some(detail) => (200, "OK", TEXT, format!("ready: {detail}\n")),
                None => (200, "OK", TEXT, "ready\n".into()),
            },
            Err(why) => (
                503,
                "Service Unavailable",
                TEXT,
                format!("not ready: {why}\n"),
            ),
        },
        _ => (
            404,
            "Not Found",
            TEXT,
            "not found: try /metrics, /healthz or /readyz\n".into(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    struct Fake {
        ready: AtomicBool,
    }

    impl Observe for Fake {
        fn render(&self, out: &mut Exposition) {
            out.counter("postern_test_things_total", "Things.", 42);
            out.family("postern_test_labelled", "Labelled.", Kind::Gauge)
                .sample("postern_test_labelled", &[("service", "a\"b\\c")], 1.5);
        }
        fn ready(&self) -> Result<(), String> {
            if self.ready.load(Ordering::Relaxed) {
                Ok(())
            } else {
                Err("control connection down".into())
            }
        }
    }

    #[test]
    fn exposition_format() {
        let text = render(
            &Fake {
                ready: AtomicBool::new(true),
            },
            None,
        );
        assert_eq!(
            text,
            "# HELP postern_test_things_total Things.\n# TYPE postern_test_things_total counter\n\
             postern_test_things_total 42\n\
             # HELP postern_test_labelled Labelled.\n# TYPE postern_test_labelled gauge\n\
             postern_test_labelled{service=\"a\\\"b\\\\c\"} 1.5\n"
        );
    }

    #[test]
    fn request_lines() {
        assert_eq!(
            parse_request(b"GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\n\r\n"),
            Ok(Request {
                head_only: false,
                path: "/metrics".into()
            })
        );
        assert_eq!(
            parse_request(b"POST /metrics HTTP/1.1\r\n\r\n").map_err(|e| e.0),
            Err(405)
        );
        assert_eq!(
            parse_request(b"GET /metrics\r\n\r\n").map_err(|e| e.0),
            Err(400)
        );
        assert_eq!(
            parse_request(b"GET / HTTP/1.1 x\r\n\r\n").map_err(|e| e.0),
            Err(400)
        );
    }

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .expect("write");
        let mut out = String::new();
        s.read_to_string(&mut out).await.expect("read");
        out
    }

    #[tokio::test]
    async fn endpoint_answers_metrics_health_and_readiness() {
        let listener = bind("127.0.0.1:0".parse().expect("addr"))
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let node = Arc::new(Fake {
            ready: AtomicBool::new(false),
        });
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(serve(listener, node.clone(), None, shutdown.clone()));
        let m = get(addr, "/metrics").await;
        assert!(m.starts_with("HTTP/1.1 200 OK\r\n"), "{m}");
        assert!(
            m.contains("\r\n\r\n# HELP postern_test_things_total"),
            "{m}"
        );
        assert!(m.contains("postern_test_things_total 42\n"), "{m}");
        assert!(get(addr, "/healthz").await.starts_with("HTTP/1.1 200 "));
        let r = get(addr, "/readyz").await;
        assert!(r.starts_with("HTTP/1.1 503 "), "{r}");
        assert!(r.contains("control connection down"), "{r}");
        node.ready.store(true, Ordering::Relaxed);
        assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 200 "));
        assert!(get(addr, "/nope").await.starts_with("HTTP/1.1 404 "));
        shutdown.cancel();
        task.await.expect("endpoint task");
    }
}
