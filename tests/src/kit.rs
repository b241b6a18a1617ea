//! In-process postern clusters on 127.0.0.1 (port 0): a throwaway CA, relays, outlets and
//! inlets, each a task cancelled on drop. One kit for the end-to-end tests and the bench, so a
//! change to how a node starts is made once.
//!
//! The fallible parts ([`Pki::generate`], [`bind_relay`], [`OutletSpec`], [`InletSpec`]) return
//! errors, for the bench, which must not panic at run time; the `start_*` shorthands over them
//! panic with the reason, which is what a test wants.

use anyhow::{anyhow, Context, Result};
use postern_inlet::{Inlet, InletHandle, InletOptions, InletService, ServiceKind};
use postern_net::transport::direct::DirectMode;
use postern_net::transport::rekey::KeyBudget;
use postern_net::transport::relay_path::{RelayTarget, TransportSettings};
use postern_outlet::serve::Services;
use postern_outlet::target::Target;
use postern_outlet::{Outlet, OutletHandle, OutletOptions};
use postern_proto::name::{NodeName, ServiceName};
use postern_proto::pki::Ca;
use postern_proto::tls::{self, Identity};
use postern_relay::forward::udp::Tap;
use postern_relay::{Relay, RelayHandle, RelayOptions};
use rustls::RootCertStore;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// How long a node started by a `*_via` shorthand or the bench may take to register or
/// connect (several relays, or a TLS/TCP fallback, take longer than one relay over UDP).
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// How long a node started by the plain test shorthands may take.
const QUICK_READY_TIMEOUT: Duration = Duration::from_secs(10);

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

// ---------------------------------------------------------------------------------------------
// Names and certificates

/// A throwaway project CA.
pub struct Pki {
    ca: Ca,
    /// How long the certificates it issues for nodes stay valid.
    validity: Duration,
}

impl Pki {
    /// A CA named `name` whose node certificates last `validity` (a bench run can outlast the
    /// tests' hour).
    pub fn generate(name: &str, validity: Duration) -> Result<Self> {
        Ok(Self {
            ca: Ca::generate(name).context("generate CA")?,
            validity,
        })
    }

    /// The tests' CA: node certificates valid for an hour.
    pub fn new() -> Self {
        Self::generate("test", Duration::from_secs(3600)).expect("generate CA")
    }

    /// A certificate and key (PEM) for `name`.
    pub fn issue_pem(&self, name: &str) -> Result<(String, String)> {
        let issued = self
            .ca
            .issue(&try_node(name)?, self.validity)
            .context("issue certificate")?;
        Ok((issued.cert_pem, issued.key_pem))
    }

    /// A fresh identity for `name`.
    pub fn try_identity(&self, name: &str) -> Result<Identity> {
        let (cert, key) = self.issue_pem(name)?;
        Identity::from_pem(&cert, &key).context("load identity")
    }

    /// [`try_identity`](Self::try_identity) for tests.
    pub fn identity(&self, name: &str) -> Identity {
        self.try_identity(name).expect("identity")
    }

    /// The CA as a root store.
    pub fn try_roots(&self) -> Result<Arc<RootCertStore>> {
        tls::roots_from_pem(self.ca.cert_pem()).context("CA roots")
    }

    /// [`try_roots`](Self::try_roots) for tests.
    pub fn roots(&self) -> Arc<RootCertStore> {
        self.try_roots().expect("roots")
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

pub fn try_node(name: &str) -> Result<NodeName> {
    NodeName::new(name).map_err(|e| anyhow!("node name {name:?}: {e}"))
}

pub fn try_svc(name: &str) -> Result<ServiceName> {
    ServiceName::new(name).map_err(|e| anyhow!("service name {name:?}: {e}"))
}

pub fn node(name: &str) -> NodeName {
    try_node(name).expect("node name")
}

pub fn svc(name: &str) -> ServiceName {
    try_svc(name).expect("service name")
}

/// The relay at `addr`, under the name every kit relay's certificate carries.
pub fn relay_target(addr: SocketAddr) -> RelayTarget {
    RelayTarget {
        addr,
        name: "relay".into(),
    }
}

/// A TLS acceptor for `host` with a certificate issued by the project CA (what an operator gets
/// from `postern-relay ca issue HOST`).
pub fn host_acceptor(pki: &Pki, host: &str) -> postern_net::stream::tls_server::TlsAcceptor {
    let identity = pki.identity(host);
    let cfg = postern_net::stream::tls_server::server_config(&identity).expect("server config");
    postern_net::stream::tls_server::TlsAcceptor::from(Arc::new(cfg))
}

// ---------------------------------------------------------------------------------------------
// Running nodes

/// A running node task; cancelled on drop.
pub struct Running {
    pub shutdown: CancellationToken,
    pub task: Option<JoinHandle<()>>,
}

impl Running {
    /// Spawns `f(shutdown)` as the node's task.
    pub fn spawn<F: std::future::Future<Output = ()> + Send + 'static>(
        f: impl FnOnce(CancellationToken) -> F,
    ) -> Self {
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(f(shutdown.clone()));
        Self {
            shutdown,
            task: Some(task),
        }
    }

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

// ---------------------------------------------------------------------------------------------
// Relays

pub struct RelayNode {
    pub addr: SocketAddr,
    pub handle: RelayHandle,
    pub running: Running,
}

/// The options of a relay on `listen` that lets every node do anything (no policy, no
/// authority).
pub fn relay_options(
    identity: Identity,
    roots: Arc<RootCertStore>,
    listen: SocketAddr,
    reset_key: [u8; 32],
    tap: Option<Tap>,
) -> RelayOptions {
    RelayOptions {
        listen,
        identity,
        roots,
        reset_key: Some(reset_key),
        tap,
        policy: postern_relay::policy::PolicySet::allow_all(),
        authority: None,
        forward_threads: postern_relay::forward::udp::default_forward_threads(),
    }
}

/// Binds a relay named "relay" on `listen` (port 0 for a free one); run it with
/// [`run_relay`] once it is set up.
pub fn bind_relay(
    pki: &Pki,
    listen: SocketAddr,
    reset_key: [u8; 32],
    tap: Option<Tap>,
) -> Result<Relay> {
    let options = relay_options(
        pki.try_identity("relay")?,
        pki.try_roots()?,
        listen,
        reset_key,
        tap,
    );
    Relay::bind(options).context("bind relay")
}

/// Runs a bound relay as a task.
pub fn run_relay(relay: Relay) -> Result<RelayNode> {
    let addr = relay.local_addr().context("relay address")?;
    let handle = relay.handle();
    let running = Running::spawn(|s| relay.run(s));
    Ok(RelayNode {
        addr,
        handle,
        running,
    })
}

/// Starts a relay on `listen` (use port 0 for a free one).
pub fn start_relay(
    pki: &Pki,
    listen: SocketAddr,
    reset_key: [u8; 32],
    tap: Option<Tap>,
) -> RelayNode {
    let relay = bind_relay(pki, listen, reset_key, tap).expect("bind relay");
    run_relay(relay).expect("run relay")
}

/// Starts a relay that also accepts nodes over TLS/TCP, on the same port number as its UDP
/// socket (the nodes' default).
pub fn start_relay_with_tcp(pki: &Pki, reset_key: [u8; 32]) -> RelayNode {
    for _ in 0..20 {
        let any = "127.0.0.1:0".parse().expect("addr");
        let mut relay = bind_relay(pki, any, reset_key, None).expect("bind relay");
        let addr = relay.local_addr().expect("relay addr");
        // The same port on TCP is usually free; if another socket holds it, try another.
        if relay.listen_tcp(addr).is_err() {
            continue;
        }
        return run_relay(relay).expect("run relay");
    }
    panic!("no UDP port whose TCP twin was free");
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
    (addr, Running::spawn(|s| ingress.run(handle, s)))
}

// ---------------------------------------------------------------------------------------------
// Outlets

pub struct OutletNode {
    pub handle: OutletHandle,
    pub running: Running,
}

/// An outlet to start: its name, relays, services and how it reaches the relays.
pub struct OutletSpec {
    pub name: String,
    /// The relays it registers with; the first is the one it is bound to.
    pub relays: Vec<SocketAddr>,
    pub services: Services,
    pub transport: TransportSettings,
    /// Services also offered at the relay's public ingress.
    pub public: Option<Arc<postern_outlet::public::Public>>,
    /// Whether its connections may take a direct path; replaces `transport.direct`. `never`
    /// unless a test asks: on loopback every route could go direct, and the tests that are
    /// about the relay path (its counters, losing it, impairing it) must stay on it.
    pub direct: DirectMode,
    /// How long it may take to register with every relay.
    pub ready_timeout: Duration,
}

impl OutletSpec {
    /// An outlet named `name` on `relay` with no services yet.
    pub fn new(name: &str, relay: SocketAddr) -> Self {
        Self {
            name: name.to_string(),
            relays: vec![relay],
            services: Services::default(),
            transport: TransportSettings::default(),
            public: None,
            direct: DirectMode::Never,
            ready_timeout: READY_TIMEOUT,
        }
    }

    /// Serves each (name, target) pair as a plain service.
    pub fn targets<'a>(
        mut self,
        targets: impl IntoIterator<Item = (&'a str, Target)>,
    ) -> Result<Self> {
        for (name, target) in targets {
            self.services.targets.insert(try_svc(name)?, target);
        }
        Ok(self)
    }

    /// Binds the outlet, runs it and waits until it has registered with every relay.
    pub async fn start(self, pki: &Pki) -> Result<OutletNode> {
        let Some((first, more)) = self.relays.split_first() else {
            return Err(anyhow!("outlet {} has no relay", self.name));
        };
        let mut outlet = Outlet::bind(OutletOptions {
            relay: relay_target(*first),
            identity: pki.try_identity(&self.name)?,
            roots: pki.try_roots()?,
            services: self.services,
        })
        .with_context(|| format!("bind outlet {}", self.name))?;
        outlet.set_transport(TransportSettings {
            direct: self.direct,
            ..self.transport
        });
        for r in more {
            outlet.add_relay(relay_target(*r));
        }
        if let Some(public) = self.public {
            outlet.set_public(public);
        }
        let mut handle = outlet.handle();
        let running = Running::spawn(|s| outlet.run(s));
        if !handle.wait_registered(self.ready_timeout).await {
            return Err(anyhow!("outlet {} did not register", self.name));
        }
        Ok(OutletNode { handle, running })
    }
}

/// Starts an outlet named `name` serving `services`, and waits until it has registered.
pub async fn start_outlet(
    pki: &Pki,
    name: &str,
    relay: SocketAddr,
    services: Vec<(&str, Target)>,
) -> OutletNode {
    let spec = OutletSpec::new(name, relay)
        .targets(services)
        .expect("service names");
    start_outlet_spec(pki, spec, QUICK_READY_TIMEOUT).await
}

/// Starts an outlet with full control over its services (e.g. with lease managers).
pub async fn start_outlet_with(
    pki: &Pki,
    name: &str,
    relay: SocketAddr,
    services: Services,
) -> OutletNode {
    let spec = OutletSpec {
        services,
        ..OutletSpec::new(name, relay)
    };
    start_outlet_spec(pki, spec, QUICK_READY_TIMEOUT).await
}

/// Like [`start_outlet_with`], also offering `public` at the relay's public ingress.
pub async fn start_outlet_public(
    pki: &Pki,
    name: &str,
    relay: SocketAddr,
    services: Services,
    public: Arc<postern_outlet::public::Public>,
) -> OutletNode {
    let spec = OutletSpec {
        services,
        public: Some(public),
        ..OutletSpec::new(name, relay)
    };
    start_outlet_spec(pki, spec, QUICK_READY_TIMEOUT).await
}

/// Starts an outlet registered with every relay in `relays`, reaching them as `transport`
/// says; waits until it has registered with all of them.
pub async fn start_outlet_via(
    pki: &Pki,
    name: &str,
    relays: &[SocketAddr],
    services: Vec<(&str, Target)>,
    transport: TransportSettings,
) -> OutletNode {
    let spec = OutletSpec {
        relays: relays.to_vec(),
        transport,
        ..OutletSpec::new(name, relays[0])
    }
    .targets(services)
    .expect("service names");
    start_outlet_spec(pki, spec, READY_TIMEOUT).await
}

async fn start_outlet_spec(pki: &Pki, spec: OutletSpec, ready_timeout: Duration) -> OutletNode {
    let spec = OutletSpec {
        ready_timeout,
        ..spec
    };
    spec.start(pki).await.expect("start outlet")
}

// ---------------------------------------------------------------------------------------------
// Inlets

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

/// An inlet to start: its name, relays, services (each on 127.0.0.1:0) and tuning.
pub struct InletSpec {
    pub name: String,
    /// The relays it uses, in order of preference.
    pub relays: Vec<SocketAddr>,
    pub services: Vec<(String, ServiceKind)>,
    pub transport: TransportSettings,
    /// Whether its connections may take a direct path; replaces `transport.direct` (`never`
    /// unless a test asks, see [`OutletSpec::direct`]).
    pub direct: DirectMode,
    /// End-to-end connections per service; the inlet's own choice when `None`.
    pub pool_size: Option<usize>,
    /// When to rotate end-to-end keys; the inlet's default when `None`.
    pub key_budget: Option<KeyBudget>,
    /// How long its control connection may take to come up.
    pub ready_timeout: Duration,
}

impl InletSpec {
    /// An inlet named `name` on `relay` with `services`.
    pub fn new(name: &str, relay: SocketAddr, services: &[(&str, ServiceKind)]) -> Self {
        Self {
            name: name.to_string(),
            relays: vec![relay],
            services: services
                .iter()
                .map(|(s, kind)| (s.to_string(), *kind))
                .collect(),
            transport: TransportSettings::default(),
            direct: DirectMode::Never,
            pool_size: None,
            key_budget: None,
            ready_timeout: READY_TIMEOUT,
        }
    }

    /// Binds the inlet (a listener on 127.0.0.1:0 per service), runs it and waits for its
    /// control connection to the first relay.
    pub async fn start(self, pki: &Pki) -> Result<InletNode> {
        let name = &self.name;
        let Some((first, more)) = self.relays.split_first() else {
            return Err(anyhow!("inlet {name} has no relay"));
        };
        let mut services = Vec::new();
        for (s, kind) in &self.services {
            services.push(InletService {
                name: try_svc(s)?,
                listen: SocketAddr::from(([127, 0, 0, 1], 0)),
                kind: *kind,
            });
        }
        let mut inlet = Inlet::bind(InletOptions {
            relay: relay_target(*first),
            identity: pki.try_identity(name)?,
            roots: pki.try_roots()?,
            services,
        })
        .await
        .with_context(|| format!("bind inlet {name}"))?;
        inlet.set_transport(TransportSettings {
            direct: self.direct,
            ..self.transport
        });
        for r in more {
            inlet.add_relay(relay_target(*r));
        }
        if let Some(budget) = self.key_budget {
            inlet.set_key_budget(budget);
        }
        let mut addrs = HashMap::new();
        for (s, _) in &self.services {
            let a = inlet
                .listen_addr(&try_svc(s)?)
                .ok_or_else(|| anyhow!("inlet {name} has no listener for {s}"))?;
            addrs.insert(s.clone(), a);
        }
        let mut handle = inlet.handle();
        if let Some(n) = self.pool_size {
            handle.set_pool_size(n);
        }
        let running = Running::spawn(|s| inlet.run(s));
        if !handle.wait_connected(self.ready_timeout).await {
            return Err(anyhow!("inlet {name} did not connect"));
        }
        Ok(InletNode {
            addrs,
            handle,
            running,
        })
    }
}

thread_local! {
    static KEY_BUDGET: std::cell::Cell<Option<KeyBudget>> = const { std::cell::Cell::new(None) };
}

/// Makes inlets started by [`start_inlet`] and [`start_inlet_kinds`] on this thread (until
/// reset) rotate keys on `budget`.
pub fn set_key_budget(budget: Option<KeyBudget>) {
    KEY_BUDGET.with(|b| b.set(budget));
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
    let spec = InletSpec {
        // One end-to-end connection per service whatever the machine's core count, so tests
        // that count connections hold everywhere; the pool has its own test.
        pool_size: Some(1),
        key_budget: KEY_BUDGET.with(|b| b.get()),
        ready_timeout: QUICK_READY_TIMEOUT,
        ..InletSpec::new(name, relay, services)
    };
    spec.start(pki).await.expect("start inlet")
}

/// Starts an inlet using `relays` (in that order), reaching them as `transport` says; waits
/// for its control connection to the first.
pub async fn start_inlet_via(
    pki: &Pki,
    name: &str,
    relays: &[SocketAddr],
    services: &[(&str, ServiceKind)],
    transport: TransportSettings,
) -> InletNode {
    let spec = InletSpec {
        relays: relays.to_vec(),
        transport,
        ..InletSpec::new(name, relays[0], services)
    };
    spec.start(pki).await.expect("start inlet")
}
