//! Outlet configuration: a TOML file, every key also a flag (flags win).

use crate::lease::config::InfluxdbOutletConfig;
use crate::target::Target;
use anyhow::{bail, Context};
use clap::Args;
use postern_net::node_config::NodeArgs;
use postern_proto::name::ServiceName;
use serde::Deserialize;
use std::collections::HashMap;
use std::path::PathBuf;

/// One `[[service]]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ServiceFile {
    /// Service name inlets ask for.
    pub name: ServiceName,
    /// Target `host:port`.
    pub to: String,
    /// Connect to the target with TLS.
    #[serde(default)]
    pub tls: bool,
    /// CA (PEM) that the target's certificate must chain to (required with `tls`).
    pub tls_ca: Option<PathBuf>,
    /// Name to verify in the target's certificate [default: the host part of `to`].
    pub tls_server_name: Option<String>,
    /// Attribute expression an inlet must satisfy to use this service, e.g.
    /// `role = "influxdb-client"` (checked by the outlet itself, after the relay's policy).
    pub allow: Option<String>,
    /// Also offer this service at the relay's public hostname,
    /// `https://<name>.<public-domain>/`, to browsers holding an access link.
    #[serde(default)]
    pub public: bool,
    /// Certificate (PEM chain) for `<name>.<public-domain>`, e.g. from
    /// `postern-relay ca issue <name>.<public-domain>` [default: none: the outlet asks the
    /// authority for one over its control connection, keeps it in its state directory and
    /// renews it].
    pub public_cert: Option<PathBuf>,
    /// Its private key (PEM).
    pub public_key: Option<PathBuf>,
    /// `never` keeps this service's end-to-end connections on the relay even where the node
    /// allows direct paths [default: the node's `direct`].
    pub direct: Option<postern_net::transport::direct::DirectMode>,
    /// `"v2"`: open each target connection with a PROXY protocol v2 header carrying the
    /// inlet's client address and the client's identity (see [`postern_proto::proxy_v2`]).
    #[serde(default)]
    pub proxy_protocol: Option<ProxyProtocol>,
    /// Check the target (a TCP connection) and tell the relay when it fails [default: true].
    #[serde(default)]
    pub health_check: Option<bool>,
    /// Time between checks, e.g. `"5s"` [default: 5s].
    #[serde(default)]
    pub health_check_interval: Option<String>,
    /// Time a check may take, e.g. `"2s"` [default: 2s].
    #[serde(default)]
    pub health_check_timeout: Option<String>,
    /// Failed checks in a row before the target counts as unhealthy [default: 2].
    #[serde(default)]
    pub health_check_failures: Option<u32>,
    /// `tcp` (default) or `udp`: datagrams from inlets' UDP listeners, sent to `to` from one
    /// socket per client flow (e.g. InfluxDB 1.x's `[[udp]]` line protocol listener).
    #[serde(default)]
    pub protocol: postern_proto::udp::Protocol,
    /// How long a UDP flow lives without a datagram either way, e.g. `"60s"` [default: 60s].
    pub udp_idle_timeout: Option<String>,
}

/// The PROXY protocol versions a service's target can be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum ProxyProtocol {
    #[serde(rename = "v2")]
    V2,
}

impl std::str::FromStr for ProxyProtocol {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        match s {
            "v2" => Ok(Self::V2),
            other => bail!("proxy-protocol {other:?}: only \"v2\" is supported"),
        }
    }
}

/// A service's health check settings as written (file keys or `--service` options).
#[derive(Debug, Clone, Default)]
pub struct CheckKeys<'a> {
    pub enabled: Option<bool>,
    pub interval: Option<&'a str>,
    pub timeout: Option<&'a str>,
    pub failures: Option<u32>,
}

impl CheckKeys<'_> {
    /// The check for `probe`, or none when turned off; `what` names the service in errors.
    pub fn resolve(
        &self,
        probe: crate::health::Probe,
        what: &str,
    ) -> anyhow::Result<Option<crate::health::CheckConfig>> {
        use postern_net::runtime::duration::parse_duration;
        if self.enabled == Some(false) {
            return Ok(None);
        }
        let mut c = crate::health::CheckConfig::new(probe);
        if let Some(i) = self.interval {
            c.interval = parse_duration(i)
                .map_err(anyhow::Error::msg)
                .with_context(|| format!("{what}: health-check-interval"))?;
        }
        if let Some(t) = self.timeout {
            c.timeout = parse_duration(t)
                .map_err(anyhow::Error::msg)
                .with_context(|| format!("{what}: health-check-timeout"))?;
        }
        if c.interval.is_zero() || c.timeout.is_zero() {
            bail!("{what}: health-check-interval and health-check-timeout must be above zero");
        }
        if let Some(f) = self.failures {
            if f == 0 {
                bail!("{what}: health-check-failures must be at least 1");
            }
            c.failures = f;
        }
        Ok(Some(c))
    }
}

/// The outlet's config file.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct OutletFile {
    /// One `host:port` or a list (the node uses every relay in it).
    pub relay: Option<postern_net::transport::relay_path::RelayList>,
    pub relay_name: Option<String>,
    /// `auto`, `udp` or `tcp`.
    pub transport: Option<postern_net::transport::relay_path::TransportMode>,
    /// `bbr`, `cubic` or `newreno`: the end-to-end congestion controller.
    pub congestion: Option<postern_net::transport::endpoint::Congestion>,
    /// `auto` or `never`: whether end-to-end connections may take a direct path.
    pub direct: Option<postern_net::transport::direct::DirectMode>,
    pub relay_tcp_port: Option<u16>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub ca: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
    pub ticket: Option<String>,
    pub name: Option<String>,
    pub metrics_addr: Option<std::net::SocketAddr>,
    pub audit_log: Option<PathBuf>,
    /// The stderr log filter, `"info"` or `"warn,postern_outlet=debug"`; put in force again by
    /// a reload. `--log` wins over it, and it over `POSTERN_LOG`.
    pub log_level: Option<String>,
    /// e.g. `"10s"`.
    pub drain_timeout: Option<String>,
    /// In a fleet of relays, how many to attach to.
    pub home_relays: Option<usize>,
    #[serde(default)]
    pub service: Vec<ServiceFile>,
    /// InfluxDB with leased credentials (the seeds' `influxdb-outlet`): offered as the service
    /// `influxdb` (or `influxdb-service`), each inlet getting its own short-lived credential.
    pub influxdb_outlet: Option<InfluxdbOutletConfig>,
    /// Service name for `[influxdb-outlet]` [default: influxdb].
    pub influxdb_service: Option<ServiceName>,
    /// The relay's public domain (its `--public-domain`): public services are
    /// `https://<service>.<public-domain>/`.
    pub public_domain: Option<String>,
    /// The relay's public port as browsers reach it, for access links [default: 443].
    pub public_port: Option<u16>,
    /// Offer the `[influxdb-outlet]` service publicly too (each access grant gets its own lease).
    #[serde(default)]
    pub influxdb_public: bool,
    /// Certificate (PEM chain) for the public InfluxDB host name [default: fetched from the
    /// authority, like `public-cert`].
    pub influxdb_public_cert: Option<PathBuf>,
    /// Its private key (PEM).
    pub influxdb_public_key: Option<PathBuf>,
    /// Check InfluxDB (`GET /ping`) and tell the relay when it fails [default: true].
    pub influxdb_health_check: Option<bool>,
    /// Time between checks of InfluxDB [default: 5s].
    pub influxdb_health_check_interval: Option<String>,
    /// Time a check of InfluxDB may take [default: 2s].
    pub influxdb_health_check_timeout: Option<String>,
    /// Failed checks in a row before InfluxDB counts as unhealthy [default: 2].
    pub influxdb_health_check_failures: Option<u32>,
}

/// `postern-outlet run` flags.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// TOML config file; keys are the long flag names (`relay = "host:4433"`, `[[service]]`
    /// tables with `name`, `to`, `tls`, `tls-ca`, `tls-server-name`, `proxy-protocol = "v2"`,
    /// `health-check`, `health-check-interval`, `health-check-timeout`,
    /// `health-check-failures`, and an `[influxdb-outlet]` table for leased InfluxDB
    /// credentials, whose `allow` is required: an attribute expression, or `"*"` for every
    /// inlet the relay routes; its target is checked with `GET /ping`, tuned by the top-level
    /// `influxdb-health-check`, `influxdb-health-check-interval`, `-timeout` and `-failures`).
    /// On SIGHUP the command line and this file are read again and their `[[service]]` tables,
    /// `[influxdb-outlet]` lease profiles and `log-level` put in force (services added or
    /// removed, `allow` changed; connections no longer allowed are closed; leases whose profile
    /// changed are revoked and replaced); an invalid file is refused, logged, and the config
    /// in force stays.
    #[arg(long, env = "POSTERN_OUTLET_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub node: postern_net::node_config::NodeFlags,
    /// Directory for the outlet's state (lease store) [default: /var/lib/postern-outlet as root,
    /// else ~/.local/state/postern-outlet; ./postern-outlet-state if it exists there].
    /// Locked while the outlet runs: a second process on it is refused, naming the first one's
    /// pid.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// A service to offer: `NAME=HOST:PORT`, optionally followed by `,tls`, `,tls-ca=PATH`,
    /// `,tls-server-name=NAME`, `,allow=EXPR`, and `,public` to offer it at the relay's public
    /// hostname too (`https://NAME.<public-domain>/`, behind access links), with the
    /// certificate for that name in `,public-cert=PATH,public-key=PATH` or, without them, one
    /// the outlet asks the relay's authority for over its control connection (its key made
    /// here and kept in the state directory under `public/`, renewed at two thirds of its
    /// life). `,proxy-protocol=v2` opens each target connection with a PROXY v2 header
    /// (the inlet's client address; TLVs 0xE0 identity name, 0xE1 attributes as JSON). The
    /// target is checked with a TCP connection every 5 s (2 s timeout; unhealthy after 2
    /// failures in a row, reported to the relay, which then routes elsewhere):
    /// `,health-check-interval=DUR`, `,health-check-timeout=DUR`, `,health-check-failures=N`,
    /// `,health-check=off`. `,protocol=udp` offers a UDP service instead (e.g. InfluxDB 1.x's
    /// `[[udp]]` line protocol listener): datagrams from inlets' UDP listeners, sent from one
    /// socket per client flow, which ends after `,udp-idle-timeout=DURATION` idle [default:
    /// 60s]. Repeatable; adds to the file's `[[service]]` tables.
    #[arg(
        long = "service",
        value_name = "NAME=HOST:PORT[,tls][,tls-ca=PATH][,public][,protocol=udp]"
    )]
    pub services: Vec<String>,
    /// TCP address serving `/metrics` (Prometheus), `/healthz` and `/readyz` (ready while the
    /// control connection to the relay is up), e.g. `127.0.0.1:9465` [default: none].
    #[arg(long)]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Append audit events (policy decisions, lease create/renew/revoke with the client's
    /// identity) to this file as JSON lines [default: none].
    #[arg(long)]
    pub audit_log: Option<PathBuf>,
    /// On SIGTERM/SIGINT, stop taking new streams and let open ones finish for at most this
    /// long, then close and revoke leases, e.g. `10s`, `500ms` [default: 10s].
    #[arg(long, value_parser = postern_net::runtime::duration::parse_duration)]
    pub drain_timeout: Option<std::time::Duration>,
    /// The relay's public domain (the relay's `--public-domain`), needed by services offered
    /// publicly (`public = true`): they are reached as `https://<service>.<public-domain>/`.
    #[arg(long)]
    pub public_domain: Option<String>,
    /// The relay's public TLS port as browsers reach it, used in access links [default: 443].
    #[arg(long)]
    pub public_port: Option<u16>,
    /// In a fleet of relays (relays sharing state in etcd, which tell the outlet the fleet's
    /// relays), attach to this many of them, chosen by rendezvous hashing of the outlet's
    /// name, instead of to every relay; inlets reaching another relay are redirected. Without
    /// a fleet every configured relay is used [default: 2].
    #[arg(long)]
    pub home_relays: Option<usize>,
}

/// The merged configuration.
#[derive(Debug)]
pub struct OutletConfig {
    pub node: NodeArgs,
    /// Relays after the first (`node.relay`), used at the same time.
    pub more_relays: Vec<String>,
    pub transport: postern_net::transport::relay_path::TransportSettings,
    pub state_dir: PathBuf,
    pub services: Vec<ServiceFile>,
    /// The lease-managed InfluxDB service, if configured.
    pub influxdb: Option<(ServiceName, InfluxdbOutletConfig)>,
    pub metrics_addr: Option<std::net::SocketAddr>,
    pub audit_log: Option<PathBuf>,
    /// The file's `log-level` (checked); the binary replaces it with the filter it uses
    /// (see [`postern_net::runtime::logging::effective_filter`]). `None`: leave logging as it is.
    pub log_level: Option<String>,
    pub drain_timeout: std::time::Duration,
    /// How many relays of a fleet to attach to.
    pub home_relays: usize,
    /// Services offered at the relay's public hostname, if any.
    pub public: Option<PublicConfig>,
    /// How the `[influxdb-outlet]` target is checked (none: not checked).
    pub influxdb_check: Option<crate::health::CheckConfig>,
}

/// The services offered at the relay's public hostname.
#[derive(Debug, Clone)]
pub struct PublicConfig {
    pub domain: String,
    pub port: u16,
    /// Service, and its certificate and key files (`None`: asked of the authority).
    pub services: Vec<(ServiceName, Option<(PathBuf, PathBuf)>)>,
}

/// Parses one `--service` flag.
pub fn parse_service_flag(s: &str) -> anyhow::Result<ServiceFile> {
    let mut parts = s.split(',');
    let head = parts.next().unwrap_or_default();
    let (name, to) = head
        .split_once('=')
        .with_context(|| format!("--service {s:?}: expected NAME=HOST:PORT"))?;
    let mut svc = ServiceFile {
        name: name
            .parse()
            .with_context(|| format!("--service {s:?}: bad service name"))?,
        to: to.to_owned(),
        tls: false,
        tls_ca: None,
        tls_server_name: None,
        allow: None,
        public: false,
        public_cert: None,
        public_key: None,
        direct: None,
        proxy_protocol: None,
        health_check: None,
        health_check_interval: None,
        health_check_timeout: None,
        health_check_failures: None,
        protocol: Default::default(),
        udp_idle_timeout: None,
    };
    for opt in parts {
        match opt.split_once('=') {
            None if opt == "tls" => svc.tls = true,
            Some(("tls-ca", p)) => svc.tls_ca = Some(PathBuf::from(p)),
            Some(("tls-server-name", n)) => svc.tls_server_name = Some(n.to_owned()),
            Some(("allow", e)) => svc.allow = Some(e.to_owned()),
            None if opt == "public" => svc.public = true,
            Some(("public-cert", p)) => svc.public_cert = Some(PathBuf::from(p)),
            Some(("public-key", p)) => svc.public_key = Some(PathBuf::from(p)),
            Some(("proxy-protocol", v)) => {
                svc.proxy_protocol = Some(v.parse().with_context(|| format!("--service {s:?}"))?)
            }
            Some(("health-check", "off")) => svc.health_check = Some(false),
            Some(("health-check", "on")) => svc.health_check = Some(true),
            Some(("health-check-interval", d)) => svc.health_check_interval = Some(d.to_owned()),
            Some(("health-check-timeout", d)) => svc.health_check_timeout = Some(d.to_owned()),
            Some(("health-check-failures", n)) => {
                svc.health_check_failures = Some(n.parse().with_context(|| {
                    format!("--service {s:?}: health-check-failures must be a number")
                })?)
            }
            Some(("protocol", "tcp")) => svc.protocol = postern_proto::udp::Protocol::Tcp,
            Some(("protocol", "udp")) => svc.protocol = postern_proto::udp::Protocol::Udp,
            Some(("udp-idle-timeout", t)) => svc.udp_idle_timeout = Some(t.to_owned()),
            _ => bail!("--service {s:?}: unknown option {opt:?} (expected tls, tls-ca=PATH, tls-server-name=NAME, allow=EXPR, public, public-cert=PATH, public-key=PATH, proxy-protocol=v2, health-check=on|off, health-check-interval=DUR, health-check-timeout=DUR, health-check-failures=N, protocol=tcp|udp or udp-idle-timeout=DURATION)"),
        }
    }
    Ok(svc)
}

impl RunArgs {
    /// Merges flags over the file over defaults.
    pub fn resolve(self) -> anyhow::Result<OutletConfig> {
        let file: OutletFile = match &self.config {
            Some(p) => postern_net::runtime::files::load_toml(p)?,
            None => OutletFile::default(),
        };
        let mut services = file.service;
        for s in &self.services {
            services.push(parse_service_flag(s)?);
        }
        let mut seen = std::collections::HashSet::new();
        for s in &services {
            if !seen.insert(s.name.clone()) {
                bail!("service {:?} is defined twice", s.name.as_str());
            }
            s.udp_target()?;
            if s.tls && s.tls_ca.is_none() {
                bail!("service {:?}: `tls = true` needs `tls-ca` (the CA the target's certificate chains to)", s.name.as_str());
            }
        }
        let influxdb = file.influxdb_outlet.map(|c| {
            let name = file
                .influxdb_service
                .unwrap_or_else(|| ServiceName::new("influxdb").unwrap_or_else(|_| unreachable!()));
            (name, c)
        });
        if let Some((name, c)) = &influxdb {
            influxdb_rule(c)?;
            if services.iter().any(|s| &s.name == name) {
                bail!(
                    "service {:?} is defined both by [influxdb-outlet] and a [[service]] table",
                    name.as_str()
                );
            }
        }
        if services.is_empty() && influxdb.is_none() {
            bail!("no services: add a [[service]] table, an [influxdb-outlet] table or pass --service NAME=HOST:PORT");
        }
        let drain_timeout = postern_net::runtime::drain::drain_timeout(
            self.drain_timeout,
            file.drain_timeout.as_deref(),
        )
        .map_err(anyhow::Error::msg)
        .context("drain-timeout")?;
        let from_file = postern_net::node_config::NodeFlags {
            relay: file
                .relay
                .map(postern_net::transport::relay_path::RelayList::into_vec)
                .unwrap_or_default(),
            transport: file.transport,
            congestion: file.congestion,
            direct: file.direct,
            relay_tcp_port: file.relay_tcp_port,
            relay_name: file.relay_name,
            ticket: file.ticket,
            name: file.name,
            cert: file.cert,
            key: file.key,
            ca: file.ca,
        };
        let (node, more_relays, transport) = self.node.over(from_file).resolve();
        let mut public_services = Vec::new();
        let mut want =
            |name: &ServiceName, cert: &Option<PathBuf>, key: &Option<PathBuf>| match (cert, key) {
                (Some(c), Some(k)) => {
                    public_services.push((name.clone(), Some((c.clone(), k.clone()))));
                    Ok(())
                }
                (None, None) => {
                    public_services.push((name.clone(), None));
                    Ok(())
                }
                _ => Err(anyhow::anyhow!(
                    "service {:?} is public: give both public-cert and public-key (a certificate \
                     for {}.<public-domain>), or neither to have the outlet ask the relay's \
                     authority for one",
                    name.as_str(),
                    name.as_str()
                )),
            };
        for s in services.iter().filter(|s| s.public) {
            want(&s.name, &s.public_cert, &s.public_key)?;
        }
        if let (true, Some((name, _))) = (file.influxdb_public, &influxdb) {
            want(name, &file.influxdb_public_cert, &file.influxdb_public_key)?;
        }
        let public = match (public_services.is_empty(), self.public_domain.or(file.public_domain)) {
            (true, _) => None,
            (false, None) => bail!(
                "services are offered publicly but no public-domain is set (the relay's --public-domain)"
            ),
            (false, Some(domain)) => Some(PublicConfig {
                domain: domain.trim_end_matches('.').to_ascii_lowercase(),
                port: self.public_port.or(file.public_port).unwrap_or(443),
                services: public_services,
            }),
        };
        let home_relays = self
            .home_relays
            .or(file.home_relays)
            .unwrap_or(postern_net::fleet::DEFAULT_HOME_RELAYS);
        if home_relays == 0 {
            bail!("home-relays must be at least 1");
        }
        let influxdb_check = CheckKeys {
            enabled: file.influxdb_health_check,
            interval: file.influxdb_health_check_interval.as_deref(),
            timeout: file.influxdb_health_check_timeout.as_deref(),
            failures: file.influxdb_health_check_failures,
        }
        .resolve(crate::health::Probe::Connect, "[influxdb-outlet]")?;
        for s in &services {
            s.check()?;
        }
        if let Some(level) = &file.log_level {
            postern_net::runtime::logging::parse_filter(level)
                .map_err(|e| anyhow::anyhow!("log-level: {e}"))?;
        }
        Ok(OutletConfig {
            log_level: file.log_level,
            home_relays,
            influxdb_check,
            public,
            more_relays,
            transport,
            metrics_addr: self.metrics_addr.or(file.metrics_addr),
            audit_log: self.audit_log.or(file.audit_log),
            drain_timeout,
            node,
            state_dir: self
                .state_dir
                .or(file.state_dir)
                .unwrap_or_else(|| postern_net::runtime::files::default_state_dir("outlet")),
            services,
            influxdb,
        })
    }
}

impl ServiceFile {
    /// How this service's target is checked (none: `health-check = false`).
    pub fn check(&self) -> anyhow::Result<Option<crate::health::CheckConfig>> {
        CheckKeys {
            enabled: self.health_check,
            interval: self.health_check_interval.as_deref(),
            timeout: self.health_check_timeout.as_deref(),
            failures: self.health_check_failures,
        }
        .resolve(
            crate::health::Probe::Connect,
            &format!("service {}", self.name),
        )
    }

    /// The UDP target of a `protocol = "udp"` service (`None` for TCP); TCP-only settings on a
    /// UDP service, and the reverse, are errors rather than ignored.
    pub fn udp_target(&self) -> anyhow::Result<Option<crate::udp::UdpTarget>> {
        use postern_proto::udp::Protocol;
        match self.protocol {
            Protocol::Tcp => {
                if self.udp_idle_timeout.is_some() {
                    bail!(
                        "service {}: udp-idle-timeout needs protocol = \"udp\"",
                        self.name
                    );
                }
                Ok(None)
            }
            Protocol::Udp => {
                if self.tls || self.public {
                    bail!(
                        "service {}: protocol = \"udp\" cannot have tls or public (they are TCP)",
                        self.name
                    );
                }
                let idle_timeout = match &self.udp_idle_timeout {
                    Some(t) => postern_net::runtime::duration::parse_duration(t)
                        .map_err(anyhow::Error::msg)
                        .with_context(|| format!("service {}: udp-idle-timeout", self.name))?,
                    None => postern_proto::udp::DEFAULT_IDLE_TIMEOUT,
                };
                if idle_timeout.is_zero() {
                    bail!("service {}: udp-idle-timeout must be above zero", self.name);
                }
                Ok(Some(crate::udp::UdpTarget {
                    to: self.to.clone(),
                    idle_timeout,
                }))
            }
        }
    }

    /// Builds the connector for this service's target, with its check and PROXY setting.
    pub fn target(&self) -> anyhow::Result<Target> {
        let mut t = self.connector()?;
        t.check = self.check()?;
        t.proxy_protocol = self.proxy_protocol == Some(ProxyProtocol::V2);
        Ok(t)
    }

    fn connector(&self) -> anyhow::Result<Target> {
        if !self.tls {
            return Ok(Target::tcp(self.to.clone()));
        }
        let ca_path = self
            .tls_ca
            .as_ref()
            .with_context(|| format!("service {}: tls-ca missing", self.name))?;
        let ca = postern_net::runtime::files::read(ca_path)?;
        let host = self
            .tls_server_name
            .clone()
            .unwrap_or_else(|| host_of(&self.to).to_owned());
        Target::tls(self.to.clone(), &ca, &host).with_context(|| format!("service {}", self.name))
    }
}

/// The host part of `host:port` (or `[v6]:port`).
pub fn host_of(to: &str) -> &str {
    let host = to.rsplit_once(':').map(|(h, _)| h).unwrap_or(to);
    host.trim_start_matches('[').trim_end_matches(']')
}

/// Parses each service's `allow` expression.
pub fn allows(
    services: &[ServiceFile],
) -> anyhow::Result<HashMap<ServiceName, postern_proto::policy::Expr>> {
    let mut out = HashMap::new();
    for s in services {
        if let Some(a) = &s.allow {
            let e = postern_proto::policy::Expr::parse(a)
                .with_context(|| format!("service {}: allow", s.name))?;
            out.insert(s.name.clone(), e);
        }
    }
    Ok(out)
}

/// `allow = "*"`: lease to every inlet the relay routes to the service (said explicitly, since
/// that hands a credential to each of them).
pub const ALLOW_ANY: &str = "*";

/// The `[influxdb-outlet]` section's own check of inlets: `None` for [`ALLOW_ANY`]. A missing
/// `allow` is an error rather than "anyone", since the README presents `allow` as the outlet's
/// own check and every inlet the relay routes would otherwise get a credential.
pub fn influxdb_rule(
    c: &InfluxdbOutletConfig,
) -> anyhow::Result<Option<postern_proto::policy::Expr>> {
    match c.allow.as_deref().map(str::trim) {
        None => bail!(
            "[influxdb-outlet] has no `allow`: without it every inlet the relay routes would get \
             a credential. Say which inlets may have one, e.g. allow = 'role = \"influxdb-client\"', \
             or allow = \"*\" for every inlet the relay's policy lets through"
        ),
        Some(ALLOW_ANY) => Ok(None),
        Some(a) => postern_proto::policy::Expr::parse(a)
            .map(Some)
            .context("[influxdb-outlet] allow"),
    }
}

/// Builds the target map of the TCP services.
pub fn targets(services: &[ServiceFile]) -> anyhow::Result<HashMap<ServiceName, Target>> {
    services
        .iter()
        .filter(|s| s.protocol == postern_proto::udp::Protocol::Tcp)
        .map(|s| Ok((s.name.clone(), s.target()?)))
        .collect()
}

/// Builds the target map of the UDP services.
pub fn udp_targets(
    services: &[ServiceFile],
) -> anyhow::Result<HashMap<ServiceName, crate::udp::UdpTarget>> {
    let mut out = HashMap::new();
    for s in services {
        if let Some(t) = s.udp_target()? {
            out.insert(s.name.clone(), t);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deploy_example_config_is_valid() {
        let file: OutletFile = toml::from_str(include_str!("../../deploy/config/outlet.toml"))
            .expect("deploy/config/outlet.toml");
        let drain = file.drain_timeout.as_deref().expect("drain-timeout");
        postern_net::runtime::duration::parse_duration(drain).expect("drain-timeout");
        assert!(file.metrics_addr.is_some() && file.audit_log.is_some());
        assert!(file.influxdb_outlet.is_some());
    }

    #[test]
    fn service_flags_parse() {
        let s = parse_service_flag("db=10.0.0.1:8086,tls,tls-ca=/x.pem").expect("parse");
        assert_eq!(s.name.as_str(), "db");
        assert!(s.tls);
        assert_eq!(s.tls_ca, Some(PathBuf::from("/x.pem")));
        assert!(parse_service_flag("db").is_err());
        assert!(parse_service_flag("DB=x:1").is_err());
        assert!(parse_service_flag("db=x:1,bogus").is_err());
    }

    #[test]
    fn udp_services_get_udp_targets_and_refuse_tcp_only_options() {
        let s = parse_service_flag("db-udp=127.0.0.1:8089,protocol=udp,udp-idle-timeout=3s")
            .expect("parse");
        let t = s.udp_target().expect("valid").expect("udp");
        assert_eq!(t.to, "127.0.0.1:8089");
        assert_eq!(t.idle_timeout, std::time::Duration::from_secs(3));
        let tcp = parse_service_flag("db=127.0.0.1:8086").expect("parse");
        assert!(tcp.udp_target().expect("valid").is_none());
        // A UDP service is offered under its name but has no TCP target.
        let all = [s.clone(), tcp];
        assert_eq!(targets(&all).expect("targets").len(), 1);
        assert_eq!(udp_targets(&all).expect("udp targets").len(), 1);
        for bad in [
            "db=127.0.0.1:1,udp-idle-timeout=5s",
            "db=127.0.0.1:1,protocol=udp,tls,tls-ca=/x.pem",
            "db=127.0.0.1:1,protocol=udp,udp-idle-timeout=0s",
        ] {
            let s = parse_service_flag(bad).expect("parses");
            assert!(s.udp_target().is_err(), "{bad}");
        }
        assert!(parse_service_flag("db=127.0.0.1:1,protocol=quic").is_err());
    }

    #[test]
    fn file_errors_name_the_key() {
        let e =
            toml::from_str::<OutletFile>("[[service]]\nname = \"a\"\nto = \"x:1\"\ntsl = true\n")
                .expect_err("unknown key");
        assert!(e.to_string().contains("tsl"), "{e}");
        let e = toml::from_str::<OutletFile>("[[service]]\nname = \"Bad Name\"\nto = \"x:1\"\n")
            .expect_err("bad name");
        assert!(e.to_string().contains("name"), "{e}");
    }

    fn args_with(file: &std::path::Path, public_domain: Option<&str>) -> RunArgs {
        RunArgs {
            config: Some(file.to_owned()),
            node: postern_net::node_config::NodeFlags::default(),
            state_dir: None,
            services: vec![],
            metrics_addr: None,
            audit_log: None,
            drain_timeout: None,
            public_domain: public_domain.map(str::to_owned),
            public_port: None,
            home_relays: None,
        }
    }

    #[test]
    fn congestion_comes_from_file_or_flag() {
        use postern_net::transport::endpoint::Congestion;
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("outlet.toml");
        let service = "[[service]]\nname = \"a\"\nto = \"127.0.0.1:1\"\n";
        std::fs::write(&file, service).expect("write");
        let cfg = args_with(&file, None).resolve().expect("default");
        assert_eq!(cfg.transport.congestion, Congestion::default());
        std::fs::write(&file, format!("congestion = \"newreno\"\n{service}")).expect("write");
        let cfg = args_with(&file, None).resolve().expect("file");
        assert_eq!(cfg.transport.congestion, Congestion::NewReno);
        let mut args = args_with(&file, None);
        args.node.congestion = Some(Congestion::Cubic);
        assert_eq!(
            args.resolve().expect("flag").transport.congestion,
            Congestion::Cubic,
            "the flag wins over the file"
        );
        std::fs::write(&file, format!("congestion = \"reno\"\n{service}")).expect("write");
        let e = format!(
            "{:#}",
            args_with(&file, None).resolve().expect_err("bad value")
        );
        assert!(e.contains("congestion") || e.contains("reno"), "{e}");
    }

    #[test]
    fn home_relays_come_from_file_or_flag_and_must_be_positive() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("outlet.toml");
        let service = "[[service]]\nname = \"a\"\nto = \"127.0.0.1:1\"\n";
        std::fs::write(&file, service).expect("write");
        let cfg = args_with(&file, None).resolve().expect("default");
        assert_eq!(cfg.home_relays, postern_net::fleet::DEFAULT_HOME_RELAYS);
        std::fs::write(&file, format!("home-relays = 3\n{service}")).expect("write");
        assert_eq!(
            args_with(&file, None).resolve().expect("file").home_relays,
            3
        );
        let mut args = args_with(&file, None);
        args.home_relays = Some(1);
        assert_eq!(
            args.resolve().expect("flag").home_relays,
            1,
            "the flag wins"
        );
        let mut args = args_with(&file, None);
        args.home_relays = Some(0);
        let e = format!("{:#}", args.resolve().expect_err("zero"));
        assert!(e.contains("home-relays"), "{e}");
    }

    #[test]
    fn influxdb_outlet_needs_allow() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("outlet.toml");
        let section = "[influxdb-outlet]\nto = \"http://127.0.0.1:8086\"\napi = \"v1\"\n\
            all-access-token = \"env:INFLUX_ADMIN\"\nleased-token-permissions = \"[]\"\n";
        std::fs::write(&file, section).expect("write");
        let e = args_with(&file, None).resolve().expect_err("no allow");
        let e = format!("{e:#}");
        assert!(
            e.contains("no `allow`") && e.contains("allow = \"*\""),
            "{e}"
        );
        std::fs::write(&file, format!("{section}allow = \"*\"\n")).expect("write");
        let cfg = args_with(&file, None).resolve().expect("explicit anyone");
        let (_, c) = cfg.influxdb.expect("influxdb");
        assert!(influxdb_rule(&c).expect("rule").is_none());
        std::fs::write(&file, format!("{section}allow = 'role = \"a\"'\n")).expect("write");
        let cfg = args_with(&file, None).resolve().expect("a rule");
        let (_, c) = cfg.influxdb.expect("influxdb");
        assert!(influxdb_rule(&c).expect("rule").is_some());
        std::fs::write(&file, format!("{section}allow = 'role ='\n")).expect("write");
        let e = args_with(&file, None).resolve().expect_err("bad rule");
        assert!(
            format!("{e:#}").contains("[influxdb-outlet] allow"),
            "{e:#}"
        );
    }

    #[test]
    fn public_services_need_a_domain_and_both_or_no_certificate_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("outlet.toml");
        let svc = "[[service]]\nname = \"ui\"\nto = \"127.0.0.1:1\"\npublic = true\n";
        std::fs::write(&file, svc).expect("write");
        // Without certificate files the outlet asks the authority for one.
        let cfg = args_with(&file, Some("relay.example.com"))
            .resolve()
            .expect("no cert files");
        let public = cfg.public.expect("public");
        assert_eq!(public.services, vec![("ui".parse().expect("name"), None)]);
        // A certificate without its key is a mistake, not a request.
        std::fs::write(&file, format!("{svc}public-cert = \"ui.pem\"\n")).expect("write");
        let e = args_with(&file, Some("relay.example.com"))
            .resolve()
            .expect_err("cert without key");
        assert!(e.to_string().contains("public-key"), "{e}");
        std::fs::write(
            &file,
            format!("{svc}public-cert = \"ui.pem\"\npublic-key = \"ui.key\"\n"),
        )
        .expect("write");
        let e = args_with(&file, None).resolve().expect_err("no domain");
        assert!(e.to_string().contains("public-domain"), "{e}");
        let cfg = args_with(&file, Some("Relay.Example.com."))
            .resolve()
            .expect("valid");
        let public = cfg.public.expect("public");
        assert_eq!(public.domain, "relay.example.com");
        assert_eq!(public.port, 443);
        assert_eq!(public.services.len(), 1);
        let flag =
            parse_service_flag("ui=x:1,public,public-cert=a.pem,public-key=a.key").expect("flag");
        assert!(flag.public && flag.public_cert.is_some() && flag.public_key.is_some());
    }

    #[test]
    fn proxy_protocol_and_health_checks_from_file_and_flag() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("outlet.toml");
        std::fs::write(
            &file,
            "[[service]]\nname = \"web\"\nto = \"127.0.0.1:8080\"\nproxy-protocol = \"v2\"\n\
             health-check-interval = \"1s\"\nhealth-check-timeout = \"300ms\"\n\
             health-check-failures = 3\n\
             [[service]]\nname = \"plain\"\nto = \"127.0.0.1:1\"\nhealth-check = false\n",
        )
        .expect("write");
        let cfg = args_with(&file, None).resolve().expect("valid");
        let targets = targets(&cfg.services).expect("targets");
        let web = &targets[&ServiceName::new("web").expect("name")];
        assert!(web.proxy_protocol);
        let check = web.check.clone().expect("checked");
        assert_eq!(check.interval, std::time::Duration::from_secs(1));
        assert_eq!(check.timeout, std::time::Duration::from_millis(300));
        assert_eq!(check.failures, 3);
        let plain = &targets[&ServiceName::new("plain").expect("name")];
        assert!(!plain.proxy_protocol && plain.check.is_none());
        let flag = parse_service_flag("db=x:1,proxy-protocol=v2,health-check-interval=250ms")
            .expect("flag")
            .target()
            .expect("target");
        assert!(flag.proxy_protocol);
        let check = flag.check.expect("checked by default");
        assert_eq!(check.interval, std::time::Duration::from_millis(250));
        assert_eq!(check.timeout, crate::health::DEFAULT_TIMEOUT);
        let e = parse_service_flag("db=x:1,proxy-protocol=v1").expect_err("v1");
        assert!(format!("{e:#}").contains("only \"v2\""), "{e:#}");
        let e = toml::from_str::<OutletFile>(
            "[[service]]\nname = \"a\"\nto = \"x:1\"\nproxy-protocol = \"v1\"\n",
        )
        .expect_err("v1 in the file");
        assert!(e.to_string().contains("v2"), "{e}");
        for bad in [
            "health-check-interval=0s",
            "health-check-failures=0",
            "health-check-timeout=soon",
        ] {
            let e = parse_service_flag(&format!("db=x:1,{bad}"))
                .and_then(|s| s.target())
                .expect_err(bad);
            assert!(format!("{e:#}").contains("health-check"), "{bad}: {e:#}");
        }
    }

    #[test]
    fn host_of_handles_v6() {
        assert_eq!(host_of("db.local:8086"), "db.local");
        assert_eq!(host_of("[::1]:8086"), "::1");
    }
}
