//! `postern-outlet`: runs next to a private service, dials out to the relay and forwards the
//! streams of authorised inlets to the service.

use anyhow::Context;
use clap::{Parser, Subcommand};
use postern_outlet::config::{allows, influxdb_rule, targets, OutletConfig, RunArgs};
use postern_outlet::lease::{admin, LeaseManager};
use postern_outlet::serve::Services;
use postern_outlet::target::Target;
use postern_outlet::{Outlet, OutletOptions};
use postern_proto::name::NodeName;
use std::path::PathBuf;
use tokio_util::sync::CancellationToken;

/// The postern outlet: registers services with a relay and forwards inlets' end-to-end
/// encrypted streams to them. No inbound port is opened. With an `[influxdb-outlet]` section it
/// also gives every inlet its own short-lived InfluxDB credential.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    /// Log filter (tracing EnvFilter syntax), e.g. `info` or `postern=debug`.
    #[arg(long, global = true, env = "POSTERN_LOG", default_value = "info")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

// Parsed once at start-up: the size difference between variants costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum Command {
    /// Run the outlet.
    Run(RunArgs),
    /// Enroll with a ticket from `postern-relay ticket create`: makes this node's key pair
    /// (the private key never leaves this machine) and gets its certificate.
    /// A state directory that is already enrolled is refused (saying as whom) and the ticket
    /// is not used: move the directory away first to enroll again.
    Enroll {
        /// The ticket string.
        ticket: String,
        /// Name to ask for [default: outlet-<hostname>]; a ticket may fix it.
        #[arg(long)]
        name: Option<String>,
        /// State directory to keep the identity in.
        #[arg(long, default_value = "postern-outlet-state")]
        state_dir: std::path::PathBuf,
    },
    /// Manage leased InfluxDB credentials of the running outlet (through its admin socket).
    Lease {
        /// The running outlet's state directory.
        #[arg(long, default_value = "postern-outlet-state", global = true)]
        state_dir: PathBuf,
        #[command(subcommand)]
        command: LeaseCommand,
    },
    /// Manage access links to the services offered at the relay's public hostname (through the
    /// running outlet's admin socket).
    Access {
        /// The running outlet's state directory.
        #[arg(long, default_value = "postern-outlet-state", global = true)]
        state_dir: PathBuf,
        #[command(subcommand)]
        command: AccessCommand,
    },
}

#[derive(Debug, Subcommand)]
enum AccessCommand {
    /// Make a time-limited access grant and print its link
    /// (`https://<service>.<public-domain>/_postern/access?grant=...`): opening it lets that
    /// browser in until the grant expires or is revoked.
    Create {
        /// The public service the link opens.
        #[arg(long)]
        service: postern_proto::name::ServiceName,
        /// How long the grant lasts, e.g. `30m`, `1h`.
        #[arg(long, default_value = "1h", value_parser = postern_net::runtime::duration::parse_duration)]
        ttl: std::time::Duration,
        /// A label recorded with the grant and in the audit log, `KEY=VALUE` (repeatable),
        /// e.g. `team=ops`.
        #[arg(long = "attr", value_name = "KEY=VALUE")]
        attrs: Vec<String>,
    },
    /// List grants (no secrets).
    List,
    /// Revoke a grant now: its browsers are refused from their next request on.
    Revoke {
        /// The grant's id, as `access list` shows it.
        id: String,
    },
}

#[derive(Debug, Subcommand)]
enum LeaseCommand {
    /// Create a lease for CLIENT by hand and print its credential and expiry.
    Create {
        /// The client identity the lease is for (appears in the backend's description).
        client: NodeName,
    },
    /// List leases.
    List,
    /// Show one lease.
    Show { lease_id: String },
    /// Revoke one lease now.
    Revoke { lease_id: String },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let command = match cli.command {
        Command::Run(args) => {
            // The config names the audit log, so it is read before logging starts.
            let cfg = args.resolve()?;
            postern_net::runtime::logging::init(&cli.log, cfg.audit_log.as_deref())?;
            return run(cfg).await;
        }
        other => other,
    };
    postern_net::runtime::logging::init(&cli.log, None)?;
    match command {
        Command::Run(_) => Ok(()),
        Command::Enroll {
            ticket,
            name,
            state_dir,
        } => postern_net::node_config::enroll_command("outlet", &ticket, name, &state_dir).await,
        Command::Lease { state_dir, command } => lease(state_dir, command).await,
        Command::Access { state_dir, command } => access(state_dir, command).await,
    }
}

async fn access(state_dir: PathBuf, command: AccessCommand) -> anyhow::Result<()> {
    use postern_outlet::public::admin as access_admin;
    let request = match command {
        AccessCommand::Create {
            service,
            ttl,
            attrs,
        } => {
            let attrs = attrs
                .iter()
                .map(|a| {
                    a.split_once('=')
                        .filter(|(k, _)| !k.is_empty())
                        .map(|(k, v)| (k.to_owned(), v.to_owned()))
                        .with_context(|| format!("--attr {a:?}: expected KEY=VALUE"))
                })
                .collect::<anyhow::Result<_>>()?;
            access_admin::Request::Create {
                service,
                ttl_ms: ttl.as_millis() as u64,
                attrs,
            }
        }
        AccessCommand::List => access_admin::Request::List,
        AccessCommand::Revoke { id } => access_admin::Request::Revoke { id },
    };
    let path = access_admin::socket_path(&state_dir);
    let response = access_admin::client_request(&path, &request)
        .await
        .with_context(|| {
            format!(
                "is the outlet running with --state-dir {} and a public service?",
                state_dir.display()
            )
        })?;
    print!("{}", response.to_text());
    if let access_admin::Response::Error { .. } = response {
        std::process::exit(1);
    }
    Ok(())
}

async fn lease(state_dir: PathBuf, command: LeaseCommand) -> anyhow::Result<()> {
    let request = match command {
        LeaseCommand::Create { client } => admin::Request::Create { client },
        LeaseCommand::List => admin::Request::List,
        LeaseCommand::Show { lease_id } => admin::Request::Show { lease_id },
        LeaseCommand::Revoke { lease_id } => admin::Request::Revoke { lease_id },
    };
    let path = admin::socket_path(&state_dir);
    let response = admin::client_request(&path, &request)
        .await
        .with_context(|| {
            format!(
                "is the outlet running with --state-dir {}?",
                state_dir.display()
            )
        })?;
    print!("{}", response.to_text());
    if let admin::Response::Error { .. } = response {
        std::process::exit(1);
    }
    Ok(())
}

async fn run(cfg: OutletConfig) -> anyhow::Result<()> {
    let recorder = match cfg.metrics_addr {
        Some(_) => {
            let r = postern_net::runtime::ops::recorder().map_err(anyhow::Error::msg)?;
            postern_outlet::metrics::describe();
            Some(r)
        }
        None => None,
    };
    // Held until the process ends: a second outlet on this identity is refused here.
    let _lock = postern_net::runtime::state_lock::lock(&cfg.state_dir, "outlet")?;
    let settings =
        postern_net::node_config::prepare(cfg.node.clone(), &cfg.state_dir, "outlet").await?;
    let (relay, identity, roots) = settings.load()?;
    // Cancelled at SIGTERM/SIGINT: the outlet drains its streams.
    let shutdown = CancellationToken::new();
    // Cancelled once the outlet has drained: leases are revoked, the admin socket closes.
    let leases_stop = CancellationToken::new();
    let mut services = Services {
        targets: targets(&cfg.services)?,
        leases: Default::default(),
        allow: allows(&cfg.services)?,
        inject_at: Default::default(),
    };
    let mut managers = Vec::new();
    if let Some((name, influx)) = cfg.influxdb {
        let lease_cfg = influx.validate().context("[influxdb-outlet]")?;
        let target = influx_target(&lease_cfg)?;
        let manager = LeaseManager::start(lease_cfg, &cfg.state_dir, leases_stop.clone())
            .await
            .context("starting the lease manager")?;
        let socket = admin::socket_path(&cfg.state_dir);
        let (m, s) = (manager.clone(), leases_stop.clone());
        tokio::spawn(async move {
            if let Err(e) = admin::serve(m, &socket, s).await {
                tracing::error!(error = %e, "lease admin socket failed");
            }
        });
        if let Some(e) = influxdb_rule(&influx)? {
            services.allow.insert(name.clone(), e);
        }
        services.targets.insert(name.clone(), target);
        services.inject_at.insert(name.clone(), influx.inject_at);
        services.leases.insert(name, manager.clone());
        managers.push(manager);
    }
    let mut outlet = Outlet::bind(OutletOptions {
        relay,
        identity,
        roots,
        services,
    })?;
    outlet.set_drain_timeout(cfg.drain_timeout);
    outlet.set_transport(cfg.transport.clone());
    // Relays given in the config, else the other relays the enrollment ticket named.
    let more_relays = if cfg.more_relays.is_empty() {
        &settings.more_relays
    } else {
        &cfg.more_relays
    };
    for relay in
        postern_net::transport::relay_path::resolve_relays(more_relays, &settings.relay_name)
            .map_err(anyhow::Error::msg)?
    {
        outlet.add_relay(relay);
    }
    if let Some(p) = &cfg.public {
        let access = postern_outlet::public::access::AccessStore::open(&cfg.state_dir)
            .context("opening the access grant store")?;
        let mut offered = std::collections::HashMap::new();
        for (name, cert, key) in &p.services {
            let acceptor = postern_net::stream::tls_server::acceptor(cert, key)
                .with_context(|| format!("public service {name}"))?;
            let host = format!("{name}.{}", p.domain);
            offered.insert(
                name.clone(),
                postern_outlet::public::PublicService { host, acceptor },
            );
        }
        let public = std::sync::Arc::new(postern_outlet::public::Public {
            services: offered,
            access: std::sync::Arc::new(access),
            link_port: p.port,
        });
        let socket = postern_outlet::public::admin::socket_path(&cfg.state_dir);
        let (pub2, stop) = (public.clone(), leases_stop.clone());
        tokio::spawn(async move {
            if let Err(e) = postern_outlet::public::admin::serve(pub2, &socket, stop).await {
                tracing::error!(error = %e, "access admin socket failed");
            }
        });
        outlet.set_public(public);
    }
    let ops_stop = CancellationToken::new();
    if let Some(addr) = cfg.metrics_addr {
        let listener = postern_net::runtime::ops::bind(addr).await?;
        tokio::spawn(postern_net::runtime::ops::serve(
            listener,
            std::sync::Arc::new(outlet.handle()),
            recorder,
            ops_stop.clone(),
        ));
    }
    let signal = shutdown.clone();
    tokio::spawn(async move {
        postern_net::runtime::signal::shutdown_signal().await;
        tracing::info!("shutdown asked for: draining");
        signal.cancel();
    });
    let handle = outlet.handle();
    postern_net::control::renew::spawn_if_enrolled(
        &cfg.state_dir,
        &settings.cert,
        handle.control(),
        move |identity| {
            if let Err(e) = handle.set_identity(&identity) {
                tracing::error!(error = %e, "cannot use the renewed certificate");
            }
        },
        shutdown.clone(),
    );
    outlet.run(shutdown).await;
    leases_stop.cancel();
    for m in managers {
        // Revokes what must not outlive the outlet.
        m.closed().await;
    }
    ops_stop.cancel();
    tracing::info!("outlet stopped");
    Ok(())
}

/// The tunnel target of the lease-managed InfluxDB: the host and port of its URL.
fn influx_target(cfg: &postern_outlet::lease::LeaseConfig) -> anyhow::Result<Target> {
    let host = cfg
        .url
        .host_str()
        .context("[influxdb-outlet] to: URL has no host")?;
    let port = cfg
        .url
        .port_or_known_default()
        .context("[influxdb-outlet] to: URL has no port")?;
    let to = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    if cfg.url.scheme() == "https" {
        let ca_path = cfg.tls_ca.as_ref().context(
            "[influxdb-outlet]: `tls = true` needs `tls-ca` for the tunnel's TLS to InfluxDB",
        )?;
        let ca = postern_net::runtime::files::read(ca_path)?;
        Ok(Target::tls(to, &ca, host)?)
    } else {
        Ok(Target::tcp(to))
    }
}
