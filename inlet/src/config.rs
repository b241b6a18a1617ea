//! Inlet configuration: a TOML file, every key also a flag (flags win).

use crate::listen::ServiceKind;
use anyhow::{bail, Context};
use clap::Args;
use postern_net::node_config::NodeArgs;
use postern_proto::name::ServiceName;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// One `[[service]]` table: a local listener for a remote service.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ServiceFile {
    /// The service's name at the relay.
    pub name: ServiceName,
    /// Local address clients connect to, e.g. `127.0.0.1:8086`.
    pub listen: SocketAddr,
    /// `tcp` (default: bytes pass untouched) or `influxdb` (HTTP requests get the leased
    /// credential streamed from the outlet in place of the client's own).
    #[serde(default)]
    pub kind: ServiceKind,
    /// TLS on the listener: PEM certificate (chain) for the name clients use, e.g.
    /// `influxdb.myproject.localhost` issued by `postern-relay ca issue`. Needs `tls-key`.
    pub tls_cert: Option<PathBuf>,
    /// The PEM private key of `tls-cert`.
    pub tls_key: Option<PathBuf>,
    /// `tcp` (default) or `udp`: listen for UDP datagrams (e.g. line protocol for InfluxDB
    /// 1.x's `[[udp]]` listener) and carry each as a QUIC datagram to the outlet, whose
    /// service must be `protocol = "udp"` too.
    #[serde(default)]
    pub protocol: postern_proto::udp::Protocol,
    /// How long a UDP client address keeps its flow without a datagram either way, e.g.
    /// `"60s"` [default: 60s].
    pub udp_idle_timeout: Option<String>,
}

impl ServiceFile {
    /// The listener's TLS certificate and key files, if it serves TLS; both or neither.
    pub fn tls_files(&self) -> anyhow::Result<Option<(&Path, &Path)>> {
        match (&self.tls_cert, &self.tls_key) {
            (Some(c), Some(k)) => Ok(Some((c, k))),
            (None, None) => Ok(None),
            (Some(_), None) => bail!("service {}: tls-cert needs tls-key", self.name),
            (None, Some(_)) => bail!("service {}: tls-key needs tls-cert", self.name),
        }
    }

    /// The idle timeout of a `protocol = "udp"` service's flows (`None` for TCP); TCP-only
    /// settings on a UDP service, and the reverse, are errors rather than ignored.
    pub fn udp_idle(&self) -> anyhow::Result<Option<std::time::Duration>> {
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
                if self.kind != ServiceKind::Tcp
                    || self.tls_cert.is_some()
                    || self.tls_key.is_some()
                {
                    bail!(
                        "service {}: protocol = \"udp\" carries datagrams as they are: it cannot \
                         have kind = \"influxdb\" or TLS",
                        self.name
                    );
                }
                let idle = match &self.udp_idle_timeout {
                    Some(t) => postern_net::runtime::duration::parse_duration(t)
                        .map_err(anyhow::Error::msg)
                        .with_context(|| format!("service {}: udp-idle-timeout", self.name))?,
                    None => postern_proto::udp::DEFAULT_IDLE_TIMEOUT,
                };
                if idle.is_zero() {
                    bail!("service {}: udp-idle-timeout must be above zero", self.name);
                }
                Ok(Some(idle))
            }
        }
    }
}

/// The inlet's config file.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct InletFile {
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
    pub metrics_addr: Option<SocketAddr>,
    /// The stderr log filter, `"info"` or `"warn,postern_inlet=debug"`; put in force again by
    /// a reload. `--log` wins over it, and it over `POSTERN_LOG`.
    pub log_level: Option<String>,
    /// e.g. `"10s"`.
    pub drain_timeout: Option<String>,
    /// Most client connections open at once on each listener.
    pub max_connections: Option<usize>,
    #[serde(default)]
    pub service: Vec<ServiceFile>,
}

/// `postern-inlet run` flags.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// TOML config file; keys are the long flag names (`relay = "host:4433"`, `[[service]]`
    /// tables with `name` and `listen`). On SIGHUP the command line and this file are read
    /// again: listeners added are bound, removed ones stop accepting and their open connections
    /// are closed, a changed `log-level` is put in force; an invalid file is refused, logged,
    /// and the config in force stays.
    #[arg(long, env = "POSTERN_INLET_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub node: postern_net::node_config::NodeFlags,
    /// Directory for the inlet's enrolled identity [default: /var/lib/postern-inlet as root, else
    /// ~/.local/state/postern-inlet; ./postern-inlet-state if it exists there]. Locked
    /// while the inlet runs: a second process on it is refused, naming the first one's pid.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// A local listener: `NAME=LISTEN_ADDR[,kind=influxdb]`, e.g.
    /// `influxdb=127.0.0.1:8086,kind=influxdb`. Repeatable; adds to the file's `[[service]]`
    /// tables. `kind=influxdb` puts the leased credential into every HTTP request;
    /// `tls-cert=PATH,tls-key=PATH` serves the listener with TLS (PEM files);
    /// `protocol=udp` listens for UDP datagrams instead (e.g. InfluxDB 1.x line protocol),
    /// carried as QUIC datagrams, each client address a flow that ends after
    /// `udp-idle-timeout=DURATION` without traffic [default: 60s].
    #[arg(
        long = "service",
        value_name = "NAME=ADDR[,kind=influxdb][,tls-cert=PATH,tls-key=PATH][,protocol=udp]"
    )]
    pub services: Vec<String>,
    /// TCP address serving `/metrics` (Prometheus), `/healthz` and `/readyz` (ready while the
    /// control connection to the relay is up), e.g. `127.0.0.1:9466` [default: none].
    #[arg(long)]
    pub metrics_addr: Option<SocketAddr>,
    /// On SIGTERM/SIGINT, stop accepting client connections and let open ones finish for at
    /// most this long before closing, e.g. `10s`, `500ms` [default: 10s].
    #[arg(long, value_parser = postern_net::runtime::duration::parse_duration)]
    pub drain_timeout: Option<std::time::Duration>,
    /// Most client connections open at once on each listener; more are closed at once (or, on
    /// `kind=influxdb` and TLS listeners, make room by closing the oldest connection that has
    /// not sent a byte yet). Lowered to fit the open-file limit (`ulimit -n`), so the process
    /// keeps descriptors for its relay connection and new clients [default: 4096].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_connections: Option<u64>,
}

/// The merged configuration.
#[derive(Debug)]
pub struct InletConfig {
    pub node: NodeArgs,
    /// Relays after the first (`node.relay`), used at the same time.
    pub more_relays: Vec<String>,
    pub transport: postern_net::transport::relay_path::TransportSettings,
    pub state_dir: PathBuf,
    pub services: Vec<ServiceFile>,
    pub metrics_addr: Option<SocketAddr>,
    /// The file's `log-level` (checked); the binary replaces it with the filter it uses
    /// (see [`postern_net::runtime::logging::effective_filter`]). `None`: leave logging as it is.
    pub log_level: Option<String>,
    pub drain_timeout: std::time::Duration,
    /// Per-listener connection cap, if set (see `--max-connections`).
    pub max_connections: Option<usize>,
}

/// Parses one `--service` flag.
pub fn parse_service_flag(s: &str) -> anyhow::Result<ServiceFile> {
    let mut parts = s.split(',');
    let head = parts.next().unwrap_or_default();
    let (name, listen) = head
        .split_once('=')
        .with_context(|| format!("--service {s:?}: expected NAME=LISTEN_ADDR"))?;
    let mut kind = ServiceKind::Tcp;
    let (mut tls_cert, mut tls_key) = (None, None);
    let (mut protocol, mut udp_idle_timeout) = (postern_proto::udp::Protocol::Tcp, None);
    for opt in parts {
        match opt.split_once('=') {
            Some(("kind", "tcp")) => kind = ServiceKind::Tcp,
            Some(("kind", "influxdb")) => kind = ServiceKind::Influxdb,
            Some(("tls-cert", p)) if !p.is_empty() => tls_cert = Some(PathBuf::from(p)),
            Some(("tls-key", p)) if !p.is_empty() => tls_key = Some(PathBuf::from(p)),
            Some(("protocol", "tcp")) => protocol = postern_proto::udp::Protocol::Tcp,
            Some(("protocol", "udp")) => protocol = postern_proto::udp::Protocol::Udp,
            Some(("udp-idle-timeout", t)) => udp_idle_timeout = Some(t.to_owned()),
            _ => bail!(
                "--service {s:?}: unknown option {opt:?} (expected kind=tcp, kind=influxdb, \
                 tls-cert=PATH, tls-key=PATH, protocol=tcp|udp or udp-idle-timeout=DURATION)"
            ),
        }
    }
    let service = ServiceFile {
        kind,
        tls_cert,
        tls_key,
        protocol,
        udp_idle_timeout,
        name: name
            .parse()
            .with_context(|| format!("--service {s:?}: bad service name"))?,
        listen: listen
            .parse()
            .with_context(|| format!("--service {s:?}: bad listen address"))?,
    };
    service.tls_files()?;
    service.udp_idle()?;
    Ok(service)
}

impl RunArgs {
    /// Merges flags over the file over defaults.
    pub fn resolve(self) -> anyhow::Result<InletConfig> {
        let file: InletFile = match &self.config {
            Some(p) => postern_net::runtime::files::load_toml(p)?,
            None => InletFile::default(),
        };
        let mut services = file.service;
        for s in &self.services {
            services.push(parse_service_flag(s)?);
        }
        if services.is_empty() {
            bail!("no services: add a [[service]] table or pass --service NAME=LISTEN_ADDR");
        }
        let mut seen = std::collections::HashSet::new();
        for s in &services {
            if !seen.insert((s.listen, s.protocol)) {
                bail!("listen address {} is used twice", s.listen);
            }
            s.tls_files()?;
            s.udp_idle()?;
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
        let max_connections = match (self.max_connections, file.max_connections) {
            (Some(n), _) => Some(usize::try_from(n).unwrap_or(usize::MAX)),
            (None, Some(0)) => bail!("max-connections must be at least 1"),
            (None, n) => n,
        };
        if let Some(level) = &file.log_level {
            postern_net::runtime::logging::parse_filter(level)
                .map_err(|e| anyhow::anyhow!("log-level: {e}"))?;
        }
        Ok(InletConfig {
            log_level: file.log_level,
            max_connections,
            more_relays,
            transport,
            metrics_addr: self.metrics_addr.or(file.metrics_addr),
            drain_timeout,
            state_dir: self
                .state_dir
                .or(file.state_dir)
                .unwrap_or_else(|| postern_net::runtime::files::default_state_dir("inlet")),
            node,
            services,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deploy_example_config_is_valid() {
        let file: InletFile = toml::from_str(include_str!("../../deploy/config/inlet.toml"))
            .expect("deploy/config/inlet.toml");
        let drain = file.drain_timeout.as_deref().expect("drain-timeout");
        postern_net::runtime::duration::parse_duration(drain).expect("drain-timeout");
        assert!(file.metrics_addr.is_some());
        assert_eq!(file.service.len(), 1);
    }

    #[test]
    fn service_flags_parse() {
        let s = parse_service_flag("influxdb=127.0.0.1:8086").expect("parse");
        assert_eq!(s.listen.port(), 8086);
        assert!(parse_service_flag("influxdb=nope").is_err());
        assert!(parse_service_flag("influxdb").is_err());
        let s = parse_service_flag("influxdb=127.0.0.1:1,kind=influxdb").expect("parse");
        assert_eq!(s.kind, ServiceKind::Influxdb);
        assert!(parse_service_flag("influxdb=127.0.0.1:1,kind=ftp").is_err());
        let s = parse_service_flag(
            "influxdb=127.0.0.1:1,kind=influxdb,tls-cert=/c/cert.pem,tls-key=/c/key.pem",
        )
        .expect("parse");
        let (cert, key) = s.tls_files().expect("tls").expect("some");
        assert_eq!(
            (cert, key),
            (Path::new("/c/cert.pem"), Path::new("/c/key.pem"))
        );
        let e = parse_service_flag("influxdb=127.0.0.1:1,tls-cert=/c/cert.pem").expect_err("half");
        assert!(e.to_string().contains("tls-key"), "{e}");
        assert!(parse_service_flag("influxdb=127.0.0.1:1,tls-key=").is_err());
    }

    #[test]
    fn udp_services_parse_and_refuse_tcp_only_options() {
        use postern_proto::udp::{Protocol, DEFAULT_IDLE_TIMEOUT};
        let s = parse_service_flag("db-udp=127.0.0.1:8089,protocol=udp").expect("parse");
        assert_eq!(s.protocol, Protocol::Udp);
        assert_eq!(s.udp_idle().expect("idle"), Some(DEFAULT_IDLE_TIMEOUT));
        let s = parse_service_flag("db-udp=127.0.0.1:8089,protocol=udp,udp-idle-timeout=5s")
            .expect("parse");
        assert_eq!(
            s.udp_idle().expect("idle"),
            Some(std::time::Duration::from_secs(5))
        );
        // TCP stays the default, and UDP-only or TCP-only options on the other are errors.
        let s = parse_service_flag("db=127.0.0.1:8086").expect("parse");
        assert_eq!(s.protocol, Protocol::Tcp);
        assert_eq!(s.udp_idle().expect("idle"), None);
        for bad in [
            "db=127.0.0.1:1,udp-idle-timeout=5s",
            "db=127.0.0.1:1,protocol=udp,kind=influxdb",
            "db=127.0.0.1:1,protocol=udp,udp-idle-timeout=0s",
            "db=127.0.0.1:1,protocol=udp,udp-idle-timeout=soon",
            "db=127.0.0.1:1,protocol=sctp",
        ] {
            assert!(parse_service_flag(bad).is_err(), "{bad}");
        }
        let f: InletFile = toml::from_str(
            "[[service]]\nname = \"a\"\nlisten = \"127.0.0.1:1\"\nprotocol = \"udp\"\n\
             udp-idle-timeout = \"2m\"\n",
        )
        .expect("parse");
        assert_eq!(
            f.service[0].udp_idle().expect("idle"),
            Some(std::time::Duration::from_secs(120))
        );
    }

    #[test]
    fn tls_keys_in_the_file_come_in_pairs() {
        let f: InletFile = toml::from_str(
            "[[service]]\nname = \"a\"\nlisten = \"127.0.0.1:1\"\ntls-key = \"k.pem\"\n",
        )
        .expect("parse");
        let e = f.service[0].tls_files().expect_err("half");
        assert!(e.to_string().contains("tls-key needs tls-cert"), "{e}");
        let f: InletFile = toml::from_str(
            "[[service]]\nname = \"a\"\nlisten = \"127.0.0.1:1\"\n\
             tls-cert = \"c.pem\"\ntls-key = \"k.pem\"\n",
        )
        .expect("parse");
        assert!(f.service[0].tls_files().expect("pair").is_some());
    }

    #[test]
    fn several_relays_and_the_transport_come_from_file_or_flags() {
        use clap::Parser;
        use postern_net::transport::relay_path::TransportMode;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            run: RunArgs,
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("inlet.toml");
        std::fs::write(
            &path,
            "relay = [\"r1:4433\", \"r2:4433\"]\ntransport = \"tcp\"\nrelay-tcp-port = 443\n\
             [[service]]\nname = \"a\"\nlisten = \"127.0.0.1:1\"\n",
        )
        .expect("write");
        let config = path.display().to_string();
        let cfg = Cli::parse_from(["inlet", "--config", &config])
            .run
            .resolve()
            .expect("file");
        assert_eq!(cfg.node.relay.as_deref(), Some("r1:4433"));
        assert_eq!(cfg.more_relays, vec!["r2:4433".to_owned()]);
        assert_eq!(cfg.transport.mode, TransportMode::Tcp);
        assert_eq!(cfg.transport.tcp_port, Some(443));
        let cfg = Cli::parse_from([
            "inlet",
            "--config",
            &config,
            "--relay",
            "x:1,y:2",
            "--relay",
            "z:3",
            "--transport",
            "udp",
        ])
        .run
        .resolve()
        .expect("flags");
        assert_eq!(cfg.node.relay.as_deref(), Some("x:1"));
        assert_eq!(cfg.more_relays, vec!["y:2".to_owned(), "z:3".to_owned()]);
        assert_eq!(cfg.transport.mode, TransportMode::Udp);
        assert!(Cli::try_parse_from(["inlet", "--transport", "quic"]).is_err());
    }

    #[test]
    fn congestion_comes_from_file_or_flag() {
        use clap::Parser;
        use postern_net::transport::endpoint::Congestion;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            run: RunArgs,
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("inlet.toml");
        const SERVICE: &str = "[[service]]\nname = \"a\"\nlisten = \"127.0.0.1:1\"\n";
        std::fs::write(
            &path,
            format!("relay = \"r:1\"\ncongestion = \"cubic\"\n{SERVICE}"),
        )
        .expect("write");
        let config = path.display().to_string();
        let resolve = |args: &[&str]| {
            Cli::parse_from(["inlet", "--config", &config].iter().chain(args))
                .run
                .resolve()
                .expect("resolve")
                .transport
                .congestion
        };
        assert_eq!(resolve(&[]), Congestion::Cubic);
        assert_eq!(resolve(&["--congestion", "newreno"]), Congestion::NewReno);
        assert_eq!(resolve(&["--congestion", "bbr"]), Congestion::Bbr);
        assert!(Cli::try_parse_from(["inlet", "--congestion", "vegas"]).is_err());
        std::fs::write(&path, format!("relay = \"r:1\"\n{SERVICE}")).expect("write");
        assert_eq!(resolve(&[]), Congestion::default());
    }

    #[test]
    fn direct_comes_from_file_or_flag_and_defaults_to_auto() {
        use clap::Parser;
        use postern_net::transport::direct::DirectMode;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            run: RunArgs,
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("inlet.toml");
        const SERVICE: &str = "[[service]]\nname = \"a\"\nlisten = \"127.0.0.1:1\"\n";
        let config = path.display().to_string();
        let resolve = |args: &[&str]| {
            Cli::parse_from(["inlet", "--config", &config].iter().chain(args))
                .run
                .resolve()
                .map(|c| c.transport.direct)
        };
        std::fs::write(&path, format!("relay = \"r:1\"\n{SERVICE}")).expect("write");
        assert_eq!(resolve(&[]).expect("resolve"), DirectMode::Auto);
        std::fs::write(
            &path,
            format!("relay = \"r:1\"\ndirect = \"never\"\n{SERVICE}"),
        )
        .expect("write");
        assert_eq!(resolve(&[]).expect("resolve"), DirectMode::Never);
        assert_eq!(
            resolve(&["--direct", "auto"]).expect("resolve"),
            DirectMode::Auto
        );
        assert!(Cli::try_parse_from(["inlet", "--direct", "sometimes"]).is_err());
        std::fs::write(
            &path,
            format!("relay = \"r:1\"\ndirect = \"sometimes\"\n{SERVICE}"),
        )
        .expect("write");
        let e = format!("{:#}", resolve(&[]).expect_err("bad value"));
        assert!(e.contains("sometimes") || e.contains("direct"), "{e}");
    }

    #[test]
    fn max_connections_comes_from_file_or_flag() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            run: RunArgs,
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("inlet.toml");
        std::fs::write(
            &path,
            "max-connections = 50\n[[service]]\nname = \"a\"\nlisten = \"127.0.0.1:1\"\n",
        )
        .expect("write");
        let config = path.display().to_string();
        let cfg = Cli::parse_from(["inlet", "--config", &config])
            .run
            .resolve()
            .expect("file");
        assert_eq!(cfg.max_connections, Some(50));
        let cfg = Cli::parse_from(["inlet", "--config", &config, "--max-connections", "7"])
            .run
            .resolve()
            .expect("flag");
        assert_eq!(cfg.max_connections, Some(7));
        assert!(Cli::try_parse_from(["inlet", "--max-connections", "0"]).is_err());
        std::fs::write(
            &path,
            "max-connections = 0\n[[service]]\nname = \"a\"\nlisten = \"127.0.0.1:1\"\n",
        )
        .expect("write");
        let e = Cli::parse_from(["inlet", "--config", &config])
            .run
            .resolve()
            .expect_err("zero");
        assert!(e.to_string().contains("max-connections"), "{e}");
    }

    #[test]
    fn file_errors_name_the_key() {
        let e = toml::from_str::<InletFile>("[[service]]\nname = \"a\"\nlisten = \"bad\"\n")
            .expect_err("bad listen");
        assert!(e.to_string().contains("listen"), "{e}");
    }
}
