//! In-process postern clusters on 127.0.0.1 with port 0, for end-to-end tests.

use postern_inlet::{Inlet, InletHandle, InletOptions, InletService, ServiceKind};
use postern_net::relay_socket::Tap;
use postern_net::transport::relay_path::RelayTarget;
use postern_outlet::serve::Services;
use postern_outlet::target::Target;
use postern_outlet::{Outlet, OutletHandle, OutletOptions};
use postern_proto::name::{NodeName, ServiceName};
use postern_proto::pki::Ca;
use postern_proto::tls::{self, Identity};
use postern_relay::{Relay, RelayHandle, RelayOptions};
use rustls::RootCertStore;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Installs a test log subscriber once (RUST_LOG controls it).
pub fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}

/// A throwaway project CA.
pub struct Pki {
    ca: Ca,
}

impl Pki {
    pub fn new() -> Self {
        Self {
            ca: Ca::generate("test").expect("generate CA"),
        }
    }

    /// A fresh identity for `name`.
    pub fn identity(&self, name: &str) -> Identity {
        let issued = self
            .ca
            .issue(&node(name), Duration::from_secs(3600))
            .expect("issue");
        Identity::from_pem(&issued.cert_pem, &issued.key_pem).expect("identity")
    }

    /// The CA as a root store.
    pub fn roots(&self) -> Arc<RootCertStore> {
        tls::roots_from_pem(self.ca.cert_pem()).expect("roots")
    }

    /// The CA certificate (PEM).
    pub fn ca_pem(&self) -> &str {
        self.ca.cert_pem()
    }

    /// The CA itself.
    pub fn ca(&self) -> &Ca {
        &self.ca
    }
}

impl Default for Pki {
    fn default() -> Self {
        Self::new()
    }
}

pub fn node(name: &str) -> NodeName {
    NodeName::new(name).expect("node name")
}

pub fn svc(name: &str) -> ServiceName {
    ServiceName::new(name).expect("service name")
}

/// A running node task; cancelled on drop.
pub struct Running {
    pub shutdown: CancellationToken,
    pub task: Option<JoinHandle<()>>,
}

impl Running {
    /// Stops the node and waits for it to finish.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(t) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

fn spawn<F: std::future::Future<Output = ()> + Send + 'static>(
    f: impl FnOnce(CancellationToken) -> F,
) -> Running {
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(f(shutdown.clone()));
    Running {
        shutdown,
        task: Some(task),
    }
}

pub struct RelayNode {
    pub addr: SocketAddr,
    pub handle: RelayHandle,
    pub running: Running,
}

/// Starts a relay on `listen` (use port 0 for a free one).
pub fn start_relay(
    pki: &Pki,
    listen: SocketAddr,
    reset_key: [u8; 32],
    tap: Option<Tap>,
) -> RelayNode {
    let relay = Relay::bind(RelayOptions {
        listen,
        identity: pki.identity("relay"),
        roots: pki.roots(),
        reset_key: Some(reset_key),
        tap,
        policy: postern_relay::policy::PolicySet::allow_all(),
        authority: None,
    })
    .expect("bind relay");
    let addr = relay.local_addr().expect("relay addr");
    let handle = relay.handle();
    let running = spawn(|s| relay.run(s));
    RelayNode {
        addr,
        handle,
        running,
    }
}

pub fn relay_target(addr: SocketAddr) -> RelayTarget {
    RelayTarget {
        addr,
        name: "relay".into(),
    }
}

pub struct OutletNode {
    pub handle: OutletHandle,
    pub running: Running,
}

/// Starts an outlet named `name` serving `services`, and waits until it has registered.
pub async fn start_outlet(
    pki: &Pki,
    name: &str,
    relay: SocketAddr,
    services: Vec<(&str, Target)>,
) -> OutletNode {
    let targets: HashMap<ServiceName, Target> =
        services.into_iter().map(|(n, t)| (svc(n), t)).collect();
    start_outlet_with(
        pki,
        name,
        relay,
        Services {
            targets,
            leases: HashMap::new(),
            allow: HashMap::new(),
            inject_at: HashMap::new(),
        },
    )
    .await
}

/// Starts an outlet with full control over its services (e.g. with lease managers).
pub async fn start_outlet_with(
    pki: &Pki,
    name: &str,
    relay: SocketAddr,
    services: Services,
) -> OutletNode {
    let outlet = Outlet::bind(OutletOptions {
        relay: relay_target(relay),
        identity: pki.identity(name),
        roots: pki.roots(),
        services,
    })
    .expect("bind outlet");
    let mut handle = outlet.handle();
    let running = spawn(|s| outlet.run(s));
    assert!(
        handle.wait_registered(Duration::from_secs(10)).await,
        "outlet {name} did not register"
    );
    OutletNode { handle, running }
}

pub struct InletNode {
    pub addrs: HashMap<String, SocketAddr>,
    pub handle: InletHandle,
    pub running: Running,
}

impl InletNode {
    pub fn addr(&self, service: &str) -> SocketAddr {
        self.addrs[service]
    }
}

/// Starts an inlet with a listener on 127.0.0.1:0 per service, and waits for its control
/// connection.
pub async fn start_inlet(pki: &Pki, name: &str, relay: SocketAddr, services: &[&str]) -> InletNode {
    let kinds: Vec<(&str, ServiceKind)> = services.iter().map(|s| (*s, ServiceKind::Tcp)).collect();
    start_inlet_kinds(pki, name, relay, &kinds).await
}

/// Like [`start_inlet`], choosing each service's kind (e.g. `Influxdb` for the HTTP filter).
pub async fn start_inlet_kinds(
    pki: &Pki,
    name: &str,
    relay: SocketAddr,
    services: &[(&str, ServiceKind)],
) -> InletNode {
    let inlet = Inlet::bind(InletOptions {
        relay: relay_target(relay),
        identity: pki.identity(name),
        roots: pki.roots(),
        services: services
            .iter()
            .map(|(s, kind)| InletService {
                name: svc(s),
                listen: "127.0.0.1:0".parse().expect("addr"),
                kind: *kind,
            })
            .collect(),
    })
    .await
    .expect("bind inlet");
    if let Some(budget) = key_budget() {
        inlet.set_key_budget(budget);
    }
    let addrs = services
        .iter()
        .map(|(s, _)| (s.to_string(), inlet.listen_addr(&svc(s)).expect("listener")))
        .collect();
    let mut handle = inlet.handle();
    // One end-to-end connection per service whatever the machine's core count, so tests that
    // count connections hold everywhere; the pool has its own test.
    handle.set_pool_size(1);
    let running = spawn(|s| inlet.run(s));
    assert!(
        handle.wait_connected(Duration::from_secs(10)).await,
        "inlet {name} did not connect"
    );
    InletNode {
        addrs,
        handle,
        running,
    }
}

/// A TCP echo server: echoes everything, then half-closes when the client does.
pub async fn echo_server() -> (SocketAddr, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind echo");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    (addr, task)
}

/// A server that reads a whole request until EOF, then answers `reply(request)` and closes.
pub async fn request_response_server(reply: fn(&[u8]) -> Vec<u8>) -> (SocketAddr, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut req = Vec::new();
                if s.read_to_end(&mut req).await.is_ok() {
                    let _ = s.write_all(&reply(&req)).await;
                    let _ = s.shutdown().await;
                }
            });
        }
    });
    (addr, task)
}

/// A free UDP port on 127.0.0.1 (for a relay that must come back on the same address).
pub fn free_udp_addr() -> SocketAddr {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    s.local_addr().expect("addr")
}

/// The Python interpreter of the test venv (made by scripts/test.sh), with the `influxdb` and
/// `influxdb-client` libraries.
pub fn python() -> std::path::PathBuf {
    if let Some(p) = std::env::var_os("POSTERN_PYTHON") {
        return p.into();
    }
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
    assert!(
        p.exists(),
        "no Python venv at {}: run scripts/test.sh (it creates it) or set POSTERN_PYTHON",
        p.display()
    );
    p
}

/// Runs a Python snippet with the venv's interpreter; returns stdout, failing on a non-zero exit.
pub async fn run_python(code: &str, args: &[&str]) -> String {
    let out = tokio::process::Command::new(python())
        .arg("-c")
        .arg(code)
        .args(args)
        .output()
        .await
        .expect("run python");
    assert!(
        out.status.success(),
        "python failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs the real `influx` CLI (1.x) against `addr`; returns stdout, failing on a non-zero exit.
pub async fn influx_cli(addr: SocketAddr, args: &[&str]) -> String {
    let out = tokio::process::Command::new("influx")
        .args([
            "-host",
            &addr.ip().to_string(),
            "-port",
            &addr.port().to_string(),
        ])
        .args(args)
        .output()
        .await
        .expect("run influx CLI (apt-get install influxdb-client)");
    assert!(
        out.status.success(),
        "influx {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

thread_local! {
    static KEY_BUDGET: std::cell::Cell<Option<postern_net::transport::rekey::KeyBudget>> = const { std::cell::Cell::new(None) };
}

/// Makes inlets started by this thread (until reset) rotate keys on `budget`.
pub fn set_key_budget(budget: Option<postern_net::transport::rekey::KeyBudget>) {
    KEY_BUDGET.with(|b| b.set(budget));
}

fn key_budget() -> Option<postern_net::transport::rekey::KeyBudget> {
    KEY_BUDGET.with(|b| b.get())
}

/// A free TCP port for a process started by a test, which must be told its port up front.
///
/// Picked at random below the kernel's ephemeral range (32768+), where `bind(0)` and outgoing
/// connections never land, so another test cannot take it between our check and the child's
/// bind; never the same port twice in one test process.
pub fn free_port() -> u16 {
    use rand::Rng;
    use std::sync::Mutex;
    static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        let port = rand::rng().random_range(20_000..32_000u16);
        if given.contains(&port) {
            continue;
        }
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.push(port);
            return port;
        }
    }
}

/// A binary of this workspace, built next to this test executable (`cargo build --bins`, which
/// scripts/test.sh runs before the tests).
pub fn bin(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe
        .parent()
        .and_then(std::path::Path::parent)
        .expect("test executable is in <target>/<profile>/deps");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the binaries first with `cargo build --bins` (scripts/test.sh does)",
        path.display()
    );
    path
}

/// Starts a relay that also accepts nodes over TLS/TCP, on the same port number as its UDP
/// socket (the nodes' default).
pub fn start_relay_with_tcp(pki: &Pki, reset_key: [u8; 32]) -> RelayNode {
    for _ in 0..20 {
        let mut relay = Relay::bind(RelayOptions {
            listen: "127.0.0.1:0".parse().expect("addr"),
            identity: pki.identity("relay"),
            roots: pki.roots(),
            reset_key: Some(reset_key),
            tap: None,
            policy: postern_relay::policy::PolicySet::allow_all(),
            authority: None,
        })
        .expect("bind relay");
        let addr = relay.local_addr().expect("relay addr");
        // The same port on TCP is usually free; if another socket holds it, try another.
        if relay.listen_tcp(addr).is_err() {
            continue;
        }
        let handle = relay.handle();
        let running = spawn(|s| relay.run(s));
        return RelayNode {
            addr,
            handle,
            running,
        };
    }
    panic!("no UDP port whose TCP twin was free");
}

/// Starts an outlet registered with every relay in `relays`, reaching them as `transport`
/// says; waits until it has registered with all of them.
pub async fn start_outlet_via(
    pki: &Pki,
    name: &str,
    relays: &[SocketAddr],
    services: Vec<(&str, Target)>,
    transport: postern_net::transport::relay_path::TransportSettings,
) -> OutletNode {
    let targets: HashMap<ServiceName, Target> =
        services.into_iter().map(|(n, t)| (svc(n), t)).collect();
    let mut outlet = Outlet::bind(OutletOptions {
        relay: relay_target(relays[0]),
        identity: pki.identity(name),
        roots: pki.roots(),
        services: Services {
            targets,
            leases: HashMap::new(),
            allow: HashMap::new(),
            inject_at: HashMap::new(),
        },
    })
    .expect("bind outlet");
    outlet.set_transport(transport);
    for r in &relays[1..] {
        outlet.add_relay(relay_target(*r));
    }
    let mut handle = outlet.handle();
    let running = spawn(|s| outlet.run(s));
    assert!(
        handle.wait_registered(Duration::from_secs(20)).await,
        "outlet {name} did not register with every relay"
    );
    OutletNode { handle, running }
}

/// Starts an inlet using `relays` (in that order), reaching them as `transport` says; waits
/// for its control connection to the first.
pub async fn start_inlet_via(
    pki: &Pki,
    name: &str,
    relays: &[SocketAddr],
    services: &[(&str, ServiceKind)],
    transport: postern_net::transport::relay_path::TransportSettings,
) -> InletNode {
    let mut inlet = Inlet::bind(InletOptions {
        relay: relay_target(relays[0]),
        identity: pki.identity(name),
        roots: pki.roots(),
        services: services
            .iter()
            .map(|(s, kind)| InletService {
                name: svc(s),
                listen: "127.0.0.1:0".parse().expect("addr"),
                kind: *kind,
            })
            .collect(),
    })
    .await
    .expect("bind inlet");
    inlet.set_transport(transport);
    for r in &relays[1..] {
        inlet.add_relay(relay_target(*r));
    }
    let addrs = services
        .iter()
        .map(|(s, _)| (s.to_string(), inlet.listen_addr(&svc(s)).expect("listener")))
        .collect();
    let mut handle = inlet.handle();
    let running = spawn(|s| inlet.run(s));
    assert!(
        handle.wait_connected(Duration::from_secs(20)).await,
        "inlet {name} did not connect"
    );
    InletNode {
        addrs,
        handle,
        running,
    }
}
/// A TLS acceptor for `host` with a certificate issued by the project CA (what an operator gets
/// from `postern-relay ca issue HOST`).
pub fn host_acceptor(pki: &Pki, host: &str) -> postern_net::stream::tls_server::TlsAcceptor {
    let issued = pki
        .ca()
        .issue(&node(host), Duration::from_secs(3600))
        .expect("issue host certificate");
    let identity = Identity::from_pem(&issued.cert_pem, &issued.key_pem).expect("identity");
    let cfg = postern_net::stream::tls_server::server_config(&identity).expect("server config");
    postern_net::stream::tls_server::TlsAcceptor::from(Arc::new(cfg))
}

/// Starts a relay's public hostname ingress on 127.0.0.1:0 for `domain`.
pub async fn start_public_ingress(
    relay: &RelayNode,
    domain: &str,
    tap: Option<postern_relay::public::PublicTap>,
) -> (SocketAddr, Running) {
    let mut opts =
        postern_relay::public::PublicOptions::new("127.0.0.1:0".parse().expect("addr"), domain);
    opts.tap = tap;
    start_public_ingress_with(relay, opts).await
}

/// [`start_public_ingress`] with full control over the options.
pub async fn start_public_ingress_with(
    relay: &RelayNode,
    opts: postern_relay::public::PublicOptions,
) -> (SocketAddr, Running) {
    let ingress = postern_relay::public::PublicIngress::bind(opts)
        .await
        .expect("bind public ingress");
    let addr = ingress.local_addr().expect("public addr");
    let handle = relay.handle.clone();
    (addr, spawn(|s| ingress.run(handle, s)))
}

/// Like [`start_outlet_with`], also offering `public` at the relay's public ingress.
pub async fn start_outlet_public(
    pki: &Pki,
    name: &str,
    relay: SocketAddr,
    services: Services,
    public: Arc<postern_outlet::public::Public>,
) -> OutletNode {
    let mut outlet = Outlet::bind(OutletOptions {
        relay: relay_target(relay),
        identity: pki.identity(name),
        roots: pki.roots(),
        services,
    })
    .expect("bind outlet");
    outlet.set_public(public);
    let mut handle = outlet.handle();
    let running = spawn(|s| outlet.run(s));
    assert!(
        handle.wait_registered(Duration::from_secs(10)).await,
        "outlet {name} did not register"
    );
    OutletNode { handle, running }
}

/// Writes `total` random bytes to `addr` (an echo service) while reading the echo; returns
/// (SHA-256 of what was sent, SHA-256 of what came back).
pub async fn echo_round(addr: SocketAddr, total: usize) -> (Vec<u8>, Vec<u8>) {
    use rand::RngCore;
    use sha2::{Digest, Sha256};
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect inlet");
    let (mut r, mut w) = stream.into_split();
    let writer = tokio::spawn(async move {
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 256 * 1024];
        let mut left = total;
        while left > 0 {
            let n = left.min(buf.len());
            rand::rng().fill_bytes(&mut buf[..n]);
            h.update(&buf[..n]);
            w.write_all(&buf[..n]).await.expect("write");
            left -= n;
        }
        w.shutdown().await.expect("shutdown");
        h.finalize().to_vec()
    });
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0;
    loop {
        let n = r.read(&mut buf).await.expect("read");
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        got += n;
    }
    assert_eq!(got, total, "echoed byte count");
    (writer.await.expect("writer"), h.finalize().to_vec())
}
