//! Relay configuration: a TOML file, every key also a flag (flags win).

use crate::fleet::{ClusterArgs, ClusterConfig, ClusterFile};
use crate::policy::{PolicyFile, PolicySet};
use clap::Args;
use postern_net::runtime::files::FileError;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::PathBuf;

/// Default UDP address of the relay.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:4433";
/// Default state directory.
pub const DEFAULT_STATE_DIR: &str = "postern-relay-state";

/// The relay's config file (`--config`). Unknown keys are errors.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct RelayFile {
    pub listen: Option<SocketAddr>,
    /// `"off"` or an address; see `--tcp-listen`.
    pub tcp_listen: Option<String>,
    pub state_dir: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub ca: Option<PathBuf>,
    pub metrics_addr: Option<SocketAddr>,
    pub audit_log: Option<PathBuf>,
    /// The stderr log filter, `"info"` or `"warn,postern_relay=debug"`; put in force again by
    /// a reload. `--log` wins over it, and it over `POSTERN_LOG`.
    pub log_level: Option<String>,
    /// e.g. `"10s"`.
    pub drain_timeout: Option<String>,
    /// `HOST:PORT` or `"off"`.
    pub admin_addr: Option<String>,
    pub admin_allow_remote: Option<bool>,
    /// Who may register and reach each service (default: nobody).
    #[serde(default)]
    pub policy: Vec<PolicyFile>,
    pub public_addr: Option<SocketAddr>,
    pub public_domain: Option<String>,
    /// e.g. `"30d"`; see `--public-cert-validity`.
    pub public_cert_validity: Option<String>,
    /// `{ etcd = [...], prefix = "/postern" }`: keep the fleet's shared state in etcd.
    pub cluster: Option<ClusterFile>,
    /// See `--forward-threads`.
    pub forward_threads: Option<usize>,
}

/// `postern-relay run` flags.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// TOML config file; its keys are the long flag names below (e.g. `listen = "0.0.0.0:4433"`).
    /// On SIGHUP or `postern-relay reload` the command line and this file are read again and
    /// their `[[policy]]` and `log-level` put in force (live routes the new policy refuses are
    /// closed); an invalid file is refused, logged, and the config in force stays.
    #[arg(long, env = "POSTERN_RELAY_CONFIG")]
    pub config: Option<PathBuf>,
    /// UDP address to listen on for nodes' QUIC connections and forwarded packets
    /// [default: 0.0.0.0:4433].
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// TCP address of the TLS fallback for nodes whose network blocks UDP (they reach the
    /// relay over TLS 1.3 and carry the same QUIC packets inside), or `off`
    /// [default: the `listen` address, on TCP].
    #[arg(long, value_name = "ADDR|off")]
    pub tcp_listen: Option<String>,
    /// Directory holding the project CA, the relay's certificate and its reset key
    /// [default: ./postern-relay-state].
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Relay certificate (PEM) [default: <state-dir>/relay.pem].
    #[arg(long)]
    pub cert: Option<PathBuf>,
    /// Relay private key (PEM) [default: <state-dir>/relay.key].
    #[arg(long)]
    pub key: Option<PathBuf>,
    /// Project CA certificate that node certificates must chain to [default: <state-dir>/ca.pem].
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// Allow registering a service: `SERVICE=EXPR`, e.g. `influxdb=role = "influxdb-outlet"`
    /// (`*` for every service). Repeatable; adds to the file's `[[policy]]` tables. Without any
    /// policy every registration and route is refused.
    #[arg(long, value_name = "SERVICE=EXPR")]
    pub allow_register: Vec<String>,
    /// Allow routes to a service: `SERVICE=EXPR`, e.g. `influxdb=role = "influxdb-client"`.
    /// Repeatable; adds to the file's `[[policy]]` tables.
    #[arg(long, value_name = "SERVICE=EXPR")]
    pub allow_route: Vec<String>,
    /// TCP address serving `/metrics` (Prometheus), `/healthz` and `/readyz`, e.g.
    /// `127.0.0.1:9464` [default: none].
    #[arg(long)]
    pub metrics_addr: Option<SocketAddr>,
    /// Append audit events (enrollments, policy decisions, revocations) to this file as JSON
    /// lines [default: none].
    #[arg(long)]
    pub audit_log: Option<PathBuf>,
    /// On SIGTERM/SIGINT, keep forwarding existing routes for at most this long (while refusing
    /// new nodes and routes) before closing, e.g. `10s`, `500ms` [default: 10s].
    #[arg(long, value_parser = postern_net::runtime::duration::parse_duration)]
    pub drain_timeout: Option<std::time::Duration>,
    /// TCP address of the admin HTTP API (nodes, services, routes, tickets; revoke, drain),
    /// or `off`. It asks for the bearer token in `<state-dir>/admin.token` (made at first
    /// start, mode 0600); `postern-relay status` reads it from there [default: 127.0.0.1:4434].
    #[arg(long, value_name = "HOST:PORT|off")]
    pub admin_addr: Option<String>,
    /// Allow `--admin-addr` on a non-loopback address (the API is plain HTTP: put it behind a
    /// TLS proxy or a private network). Without it such an address is refused.
    #[arg(long)]
    pub admin_allow_remote: bool,
    /// TCP address of the public hostname ingress, e.g. `0.0.0.0:443`: browsers open
    /// `https://<service>.<public-domain>/` and reach an outlet that offers `service` publicly.
    /// The relay reads only the TLS server name and never decrypts (the outlet holds the
    /// certificate) [default: none; needs --public-domain].
    #[arg(long, requires = "public_domain")]
    pub public_addr: Option<SocketAddr>,
    /// The DNS domain whose one-label subdomains name public services, e.g. `relay.example.com`
    /// for `https://influxdb.relay.example.com/` (point `*.relay.example.com` at this relay).
    #[arg(long)]
    pub public_domain: Option<String>,
    /// Lifetime of the certificates for `<service>.<public-domain>` that this relay, when it
    /// holds the authority, signs for outlets offering a service publicly without certificate
    /// files of their own (they ask over their control connection, keep the key, and renew at
    /// two thirds of it), e.g. `30d`, `12h` [default: 30d].
    #[arg(long, value_parser = postern_net::runtime::duration::parse_duration)]
    pub public_cert_validity: Option<std::time::Duration>,
    /// UDP sockets bound on the `listen` port with SO_REUSEPORT, each forwarding the packets
    /// the kernel hands it (spread by source address and port) on its own task, so forwarding
    /// uses that many cores; 1 is a single socket, forwarding inside the QUIC endpoint's
    /// receive path. At most 16 [default: the number of cores, at most 16].
    #[arg(long, value_name = "N")]
    pub forward_threads: Option<usize>,
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// Check the configuration (file and flags, policy and cluster included) and exit
    /// without starting: for deploy scripts, before a restart.
    #[arg(long)]
    pub check: bool,
}

/// The merged configuration.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    pub policy: PolicySet,
    pub listen: SocketAddr,
    /// TLS/TCP fallback address; None when turned off.
    pub tcp_listen: Option<SocketAddr>,
    /// Whether `tcp_listen` was asked for (then failing to bind it is an error), or is the
    /// default (then the relay runs on UDP alone, with a warning).
    pub tcp_listen_explicit: bool,
    pub state_dir: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
    pub metrics_addr: Option<SocketAddr>,
    pub audit_log: Option<PathBuf>,
    pub drain_timeout: std::time::Duration,
    /// Where the admin API listens (`None`: off).
    pub admin_addr: Option<SocketAddr>,
    /// Whether `admin_addr` was asked for (then failing to bind it is an error; the default
    /// address being taken only disables the API with a warning).
    pub admin_addr_explicit: bool,
    /// Public hostname ingress: TCP address and domain.
    pub public: Option<(SocketAddr, String)>,
    /// Lifetime of the public hostname certificates signed for outlets.
    pub public_cert_validity: std::time::Duration,
    /// The log filter to put in force: the file's `log-level` (checked) from
    /// [`RunArgs::resolve`]; the binary replaces it with the one it uses (`--log` over the
    /// file over `POSTERN_LOG` over `info`). `None`: leave logging as it is.
    pub log_level: Option<String>,
    /// The etcd cluster holding the fleet's shared state (`None`: the state directory).
    pub cluster: Option<ClusterConfig>,
    /// Sockets (and forwarding tasks) on the UDP port; see `--forward-threads`.
    pub forward_threads: usize,
}

/// A DNS domain: dot-separated labels of letters, digits and `-`.
fn valid_domain(d: &str) -> bool {
    let d = d.strip_suffix('.').unwrap_or(d);
    !d.is_empty()
        && d.len() <= 253
        && d.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

impl RunArgs {
    /// Merges flags over the file over defaults.
    pub fn resolve(self) -> Result<RelayConfig, FileError> {
        let file: RelayFile = match &self.config {
            Some(p) => postern_net::runtime::files::load_toml(p)?,
            None => RelayFile::default(),
        };
        let state_dir = self
            .state_dir
            .or(file.state_dir)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
        let listen = self
            .listen
            .or(file.listen)
            .unwrap_or_else(|| DEFAULT_LISTEN.parse().unwrap_or_else(|_| unreachable!()));
        let mut tables = file.policy;
        for (flag, register) in self
            .allow_register
            .iter()
            .map(|f| (f, true))
            .chain(self.allow_route.iter().map(|f| (f, false)))
        {
            let (service, expr) = flag.split_once('=').ok_or_else(|| FileError::Config {
                path: PathBuf::from("--allow-register/--allow-route"),
                message: format!("{flag:?}: expected SERVICE=EXPR"),
            })?;
            tables.push(PolicyFile {
                service: service.to_owned(),
                register: register.then(|| expr.to_owned()),
                route: (!register).then(|| expr.to_owned()),
            });
        }
        let policy = PolicySet::from_config(&tables).map_err(|message| FileError::Config {
            path: self
                .config
                .clone()
                .unwrap_or_else(|| PathBuf::from("flags")),
            message,
        })?;
        let drain_timeout = postern_net::runtime::drain::drain_timeout(
            self.drain_timeout,
            file.drain_timeout.as_deref(),
        )
        .map_err(|message| FileError::Config {
            path: self
                .config
                .clone()
                .unwrap_or_else(|| PathBuf::from("flags")),
            message: format!("drain-timeout: {message}"),
        })?;
        let config_error = |message: String| FileError::Config {
            path: self
                .config
                .clone()
                .unwrap_or_else(|| PathBuf::from("flags")),
            message,
        };
        let admin_text = self.admin_addr.or(file.admin_addr);
        let admin_addr_explicit = admin_text.is_some();
        let admin_addr = crate::admin::parse_admin_addr(
            admin_text
                .as_deref()
                .unwrap_or(crate::admin::DEFAULT_ADMIN_ADDR),
        )
        .map_err(|e| config_error(format!("admin-addr: {e}")))?;
        let allow_remote = self.admin_allow_remote || file.admin_allow_remote.unwrap_or(false);
        if let Some(addr) = admin_addr {
            if !addr.ip().is_loopback() && !allow_remote {
                return Err(config_error(format!(
                    "admin-addr: {addr} is not a loopback address; the admin API is plain HTTP, so \
                     pass --admin-allow-remote (key admin-allow-remote) if it is on a private \
                     network or behind a TLS proxy"
                )));
            }
        }
        let tcp_text = self.tcp_listen.or(file.tcp_listen);
        let tcp_listen_explicit = tcp_text.is_some();
        let tcp_listen = match tcp_text.as_deref() {
            None => Some(listen),
            Some("off") => None,
            Some(text) => Some(text.parse().map_err(|e| {
                FileError::Config {
                    path: self
                        .config
                        .clone()
                        .unwrap_or_else(|| PathBuf::from("flags")),
                    message: format!("tcp-listen {text:?}: {e} (expected an address or `off`)"),
                }
            })?),
        };
        let public = match (
            self.public_addr.or(file.public_addr),
            self.public_domain.or(file.public_domain),
        ) {
            (Some(addr), Some(domain)) if valid_domain(&domain) => Some((addr, domain)),
            (Some(_), Some(domain)) => {
                return Err(FileError::Config {
                    path: PathBuf::from("public-domain"),
                    message: format!("{domain:?} is not a DNS domain (e.g. relay.example.com)"),
                })
            }
            (None, None) => None,
            _ => {
                return Err(FileError::Config {
                    path: PathBuf::from("public-addr/public-domain"),
                    message: "the public ingress needs both public-addr and public-domain".into(),
                })
            }
        };
        let public_cert_validity = match (self.public_cert_validity, &file.public_cert_validity) {
            (Some(d), _) => d,
            (None, Some(text)) => postern_net::runtime::duration::parse_duration(text)
                .map_err(|e| config_error(format!("public-cert-validity: {e}")))?,
            (None, None) => crate::authority::PUBLIC_CERT_VALIDITY,
        };
        if public_cert_validity < std::time::Duration::from_secs(1) {
            return Err(config_error(
                "public-cert-validity: must be at least 1s".into(),
            ));
        }
        let forward_threads = match self.forward_threads.or(file.forward_threads) {
            None => crate::forward::udp::default_forward_threads(),
            Some(n) if (1..=crate::forward::udp::MAX_FORWARD_THREADS).contains(&n) => n,
            Some(n) => {
                return Err(config_error(format!(
                    "forward-threads: {n} is out of range (1 to {})",
                    crate::forward::udp::MAX_FORWARD_THREADS
                )))
            }
        };
        let cluster = self
            .cluster
            .resolve(file.cluster)
            .map_err(|message| FileError::Config {
                path: self
                    .config
                    .clone()
                    .unwrap_or_else(|| PathBuf::from("flags")),
                message,
            })?;
        let log_level = match file.log_level {
            Some(level) => {
                postern_net::runtime::logging::parse_filter(&level)
                    .map_err(|e| config_error(format!("log-level: {e}")))?;
                Some(level)
            }
            None => None,
        };
        Ok(RelayConfig {
            log_level,
            forward_threads,
            cluster,
            public,
            public_cert_validity,
            admin_addr,
            admin_addr_explicit,
            policy,
            listen,
            tcp_listen,
            tcp_listen_explicit,
            metrics_addr: self.metrics_addr.or(file.metrics_addr),
            audit_log: self.audit_log.or(file.audit_log),
            drain_timeout,
            cert: self
                .cert
                .or(file.cert)
                .unwrap_or_else(|| state_dir.join("relay.pem")),
            key: self
                .key
                .or(file.key)
                .unwrap_or_else(|| state_dir.join("relay.key")),
            ca: self
                .ca
                .or(file.ca)
                .unwrap_or_else(|| state_dir.join("ca.pem")),
            state_dir,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deploy_example_config_is_valid() {
        let file: RelayFile = toml::from_str(include_str!("../../deploy/config/relay.toml"))
            .expect("deploy/config/relay.toml");
        PolicySet::from_config(&file.policy).expect("policy");
        let drain = file.drain_timeout.as_deref().expect("drain-timeout");
        postern_net::runtime::duration::parse_duration(drain).expect("drain-timeout");
        assert!(file.metrics_addr.is_some() && file.audit_log.is_some());
        let admin = file.admin_addr.as_deref().expect("admin-addr");
        assert!(crate::admin::parse_admin_addr(admin)
            .expect("admin-addr")
            .is_some());
    }

    #[test]
    fn deploy_example_cluster_is_valid() {
        let line = include_str!("../../deploy/config/relay.toml")
            .lines()
            .find_map(|l| l.strip_prefix("# cluster = "))
            .expect("the example's commented cluster line");
        let file: RelayFile = toml::from_str(&format!("cluster = {line}")).expect("cluster");
        let cluster = ClusterArgs::default()
            .resolve(file.cluster)
            .expect("resolves")
            .expect("etcd configured");
        assert_eq!(
            (cluster.endpoints.len(), cluster.prefix.as_str()),
            (3, "/postern")
        );
        assert!(cluster.user.is_some() && cluster.password.is_some());
    }

    /// Every relay config of the fleet example resolves (policy, cluster and all), so the
    /// example cannot drift from what `postern-relay run` accepts.
    #[test]
    fn deploy_fleet_configs_are_valid() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/fleet");
        let mut names = Vec::new();
        for entry in std::fs::read_dir(&dir).expect("deploy/fleet") {
            let path = entry.expect("entry").path();
            if path.extension().and_then(|e| e.to_str()) != Some("toml") {
                continue;
            }
            let cfg = args(&["--config", path.to_str().expect("utf-8 path")])
                .resolve()
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let cluster = cfg
                .cluster
                .unwrap_or_else(|| panic!("{}: no cluster", path.display()));
            assert_eq!(cluster.endpoints.len(), 3, "{}", path.display());
            names.extend(cluster.name);
        }
        // relay-1..3.toml name three different relays (compose-relay.toml names none: its
        // relays get their names from the command line).
        names.sort();
        assert_eq!(names, ["relay-1", "relay-2", "relay-3"]);
    }

    fn args(extra: &[&str]) -> RunArgs {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            run: RunArgs,
        }
        let mut argv = vec!["postern-relay"];
        argv.extend_from_slice(extra);
        Cli::try_parse_from(argv).expect("flags").run
    }

    #[test]
    fn admin_api_is_on_loopback_by_default_and_remote_only_when_allowed() {
        let cfg = args(&[]).resolve().expect("defaults");
        assert_eq!(
            cfg.admin_addr,
            Some(crate::admin::DEFAULT_ADMIN_ADDR.parse().expect("addr"))
        );
        assert!(!cfg.admin_addr_explicit);
        let cfg = args(&["--admin-addr", "off"]).resolve().expect("off");
        assert_eq!(cfg.admin_addr, None);
        let err = args(&["--admin-addr", "0.0.0.0:4434"])
            .resolve()
            .expect_err("remote without allow");
        assert!(err.to_string().contains("--admin-allow-remote"), "{err}");
        let cfg = args(&["--admin-addr", "0.0.0.0:4434", "--admin-allow-remote"])
            .resolve()
            .expect("remote allowed");
        assert!(cfg.admin_addr_explicit);
        let err = args(&["--admin-addr", "nowhere"])
            .resolve()
            .expect_err("bad address");
        assert!(err.to_string().contains("admin-addr"), "{err}");
    }

    fn resolve(args: &[&str]) -> Result<RelayConfig, FileError> {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            run: RunArgs,
        }
        let argv = std::iter::once("postern-relay").chain(args.iter().copied());
        Cli::parse_from(argv).run.resolve()
    }

    #[test]
    fn tcp_fallback_defaults_to_the_udp_address_and_can_be_moved_or_turned_off() {
        let cfg = resolve(&["--listen", "127.0.0.1:4500"]).expect("default");
        assert_eq!(
            cfg.tcp_listen,
            Some("127.0.0.1:4500".parse().expect("addr"))
        );
        assert!(!cfg.tcp_listen_explicit);
        let cfg = resolve(&["--tcp-listen", "0.0.0.0:443"]).expect("moved");
        assert_eq!(cfg.tcp_listen, Some("0.0.0.0:443".parse().expect("addr")));
        assert!(cfg.tcp_listen_explicit);
        let cfg = resolve(&["--tcp-listen", "off"]).expect("off");
        assert_eq!(cfg.tcp_listen, None);
        let e = resolve(&["--tcp-listen", "nowhere"]).expect_err("bad");
        assert!(e.to_string().contains("tcp-listen"), "{e}");
    }

    #[test]
    fn log_level_is_read_and_checked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("relay.toml");
        let path = file.display().to_string();
        std::fs::write(&file, "log-level = \"warn,postern_relay=debug\"\n").expect("write");
        let cfg = resolve(&["--config", &path]).expect("a filter");
        assert_eq!(cfg.log_level.as_deref(), Some("warn,postern_relay=debug"));
        assert_eq!(resolve(&[]).expect("none").log_level, None);
        std::fs::write(&file, "log-level = \"loud\"\n").expect("write");
        let e = resolve(&["--config", &path]).expect_err("not a level");
        assert!(
            e.to_string().contains("log-level") && e.to_string().contains("loud"),
            "{e}"
        );
    }

    #[test]
    fn unknown_key_is_named() {
        let err = toml::from_str::<RelayFile>("lisen = \"1.2.3.4:5\"").expect_err("unknown key");
        assert!(err.to_string().contains("lisen"), "{err}");
    }

    #[test]
    fn bad_value_names_the_key() {
        let err = toml::from_str::<RelayFile>("listen = \"nope\"").expect_err("bad addr");
        assert!(err.to_string().contains("listen"), "{err}");
    }

    #[test]
    fn forward_threads_default_to_the_cores_and_refuse_out_of_range() {
        let cfg = resolve(&[]).expect("default");
        assert_eq!(
            cfg.forward_threads,
            crate::forward::udp::default_forward_threads()
        );
        assert_eq!(
            resolve(&["--forward-threads", "1"])
                .expect("one")
                .forward_threads,
            1
        );
        assert_eq!(
            resolve(&["--forward-threads", "16"])
                .expect("max")
                .forward_threads,
            16
        );
        for bad in ["0", "17"] {
            let err = resolve(&["--forward-threads", bad]).expect_err(bad);
            assert!(err.to_string().contains("forward-threads"), "{err}");
        }
        let file: RelayFile = toml::from_str("forward-threads = 3").expect("key");
        assert_eq!(file.forward_threads, Some(3));
    }
}
