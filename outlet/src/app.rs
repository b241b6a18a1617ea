//! Starting an outlet from its merged configuration: the one entry the binary (and anything
//! else that runs an outlet as the binary would) calls.

use crate::config::{allows, influxdb_rule, targets, udp_targets, OutletConfig};
use crate::lease::{admin, LeaseConfig, LeaseManager};
use crate::node::{Outlet, OutletOptions};
use crate::serve::Services;
use crate::target::Target;
use anyhow::Context;
use tokio_util::sync::CancellationToken;

/// Runs an outlet as configured until `shutdown`, then drains its streams and stops: takes the
/// state directory's lock, loads (or first prepares) the identity, starts the lease manager and
/// its admin socket for an `[influxdb-outlet]`, the public services and their access admin
/// socket, `/metrics` when asked, and certificate renewal when it was enrolled. Leases are
/// revoked once the streams have drained.
pub async fn run(cfg: OutletConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    run_with_reload(cfg, shutdown, None).await
}

/// Reads the configuration again (the binary: the same command line and config file).
pub type Reread = Box<dyn Fn() -> anyhow::Result<OutletConfig> + Send + Sync>;

/// [`run`], and on each `SIGHUP` the services and lease profiles of `reread()` are put in
/// force (see [`crate::reload`]); a config that does not read or validate is refused, the error logged,
/// and the one in force stays.
pub async fn run_with_reload(
    cfg: OutletConfig,
    shutdown: CancellationToken,
    reread: Option<Reread>,
) -> anyhow::Result<()> {
    let recorder =
        postern_net::runtime::ops::recorder_if_asked(cfg.metrics_addr, crate::metrics::describe)
            .map_err(anyhow::Error::msg)?;
    // Held until the process ends: a second outlet on this identity is refused here.
    let _lock = postern_net::runtime::state_lock::lock(&cfg.state_dir, "outlet")?;
    let Some(settings) =
        postern_net::node_config::prepare(cfg.node.clone(), &cfg.state_dir, "outlet", &shutdown)
            .await?
    else {
        tracing::info!("stopped before enrolling");
        return Ok(());
    };
    let (relay, identity, roots) = settings.load()?;
    let first = relay.addr;
    // Cancelled once the outlet has drained: leases are revoked, the admin socket closes.
    let leases_stop = CancellationToken::new();
    let mut services = Services {
        targets: targets(&cfg.services)?,
        leases: Default::default(),
        allow: allows(&cfg.services)?,
        inject_at: Default::default(),
        udp: udp_targets(&cfg.services)?,
    };
    let mut managers = Vec::new();
    // What a reload compares a new `[influxdb-outlet]` with, and whose profiles it replaces.
    let mut running_leases = None;
    if let Some((name, influx)) = cfg.influxdb {
        let lease_cfg = influx.validate().context("[influxdb-outlet]")?;
        let mut target = influx_target(&lease_cfg)?;
        // `/ping` rather than a bare connection: InfluxDB may accept connections and still
        // answer nothing useful (starting, or its storage failing).
        target.check = cfg.influxdb_check.clone().map(|mut c| {
            c.probe = crate::health::Probe::InfluxPing {
                host: crate::config::host_of(&target.to).to_owned(),
            };
            c
        });
        let started_with = lease_cfg.clone();
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
        services.leases.insert(name.clone(), manager.clone());
        running_leases = Some((
            crate::reload::RunningLeases {
                service: name,
                config: started_with,
                inject_at: influx.inject_at,
            },
            manager.clone(),
        ));
        managers.push(manager);
    }
    let mut outlet = Outlet::bind(OutletOptions {
        relay,
        identity,
        roots,
        services,
    })?;
    outlet.set_drain_timeout(cfg.drain_timeout);
    outlet.set_home_relays(cfg.home_relays);
    outlet.set_transport(cfg.transport.clone());
    outlet.set_direct_never(
        cfg.services
            .iter()
            .filter(|s| s.direct == Some(postern_net::transport::direct::DirectMode::Never))
            .map(|s| s.name.clone())
            .collect(),
    );
    // Relays given in the config, else the other relays the enrollment ticket named.
    let more_relays = if cfg.more_relays.is_empty() {
        &settings.more_relays
    } else {
        &cfg.more_relays
    };
    // A name resolving to several addresses is several relays (a fleet's DNS name).
    let all_relays: Vec<String> = std::iter::once(settings.relay.clone())
        .chain(more_relays.iter().cloned())
        .collect();
    for relay in
        postern_net::transport::relay_path::resolve_all(&all_relays, &settings.relay_name, first)
            .map_err(anyhow::Error::msg)?
    {
        outlet.add_relay(relay);
    }
    if let Some(p) = &cfg.public {
        let access = crate::public::access::AccessStore::open(&cfg.state_dir)
            .context("opening the access grant store")?;
        let mut offered = std::collections::HashMap::new();
        for (name, files) in &p.services {
            let host = format!("{name}.{}", p.domain);
            // Certificate files given win; without them the outlet asks the authority.
            let acceptor = match files {
                Some((cert, key)) => postern_net::stream::tls_server::acceptor(cert, key)
                    .with_context(|| format!("public service {name}"))?,
                None => {
                    let (fetched, acceptor) = crate::public::cert::Fetched::new(
                        &cfg.state_dir,
                        name.clone(),
                        host.clone(),
                    )
                    .with_context(|| format!("public service {name}"))?;
                    tokio::spawn(fetched.run(outlet.handle().control(), shutdown.clone()));
                    acceptor
                }
            };
            offered.insert(
                name.clone(),
                crate::public::PublicService { host, acceptor },
            );
        }
        let public = std::sync::Arc::new(crate::public::Public {
            services: offered,
            access: std::sync::Arc::new(access),
            link_port: p.port,
        });
        let socket = crate::public::admin::socket_path(&cfg.state_dir);
        let (pub2, stop) = (public.clone(), leases_stop.clone());
        tokio::spawn(async move {
            if let Err(e) = crate::public::admin::serve(pub2, &socket, stop).await {
                tracing::error!(error = %e, "access admin socket failed");
            }
        });
        outlet.set_public(public);
    }
    let ops_stop = CancellationToken::new();
    postern_net::runtime::ops::serve_if_asked(
        cfg.metrics_addr,
        std::sync::Arc::new(outlet.handle()),
        recorder,
        ops_stop.clone(),
    )
    .await?;
    outlet
        .handle()
        .renew_automatically(&cfg.state_dir, &settings.cert, shutdown.clone());
    if let Some(reread) = reread {
        let handle = outlet.handle();
        let mut hups = postern_net::runtime::signal::hangups(shutdown.clone());
        tokio::spawn(async move {
            while hups.recv().await.is_some() {
                tracing::info!("SIGHUP: reloading the config");
                tracing::debug!("rereading the command line and config file");
                let services = reread().and_then(|cfg| {
                    let s = crate::reload::services_from(&cfg, &handle.live_services())?;
                    let profiles = match &running_leases {
                        Some((r, manager)) => {
                            crate::reload::lease_profiles(&cfg, r)?.map(|p| (manager.clone(), p))
                        }
                        None => None,
                    };
                    // Checked when the config was read: fails only if logging cannot change.
                    if let Some(level) = &cfg.log_level {
                        postern_net::runtime::logging::set_filter(level)?;
                    }
                    Ok((s, profiles, cfg.log_level))
                });
                match services {
                    Ok((s, profiles, log_level)) => {
                        let names = s.names();
                        if let Some((manager, profiles)) = profiles {
                            manager.set_profiles(profiles).await;
                        }
                        let closed = handle.reload(s).await;
                        tracing::info!(services = ?names, closed, log_level, "config reloaded");
                    }
                    Err(e) => tracing::error!(
                        error = format!("{e:#}"),
                        "reload refused: the new config is invalid; the one in force stays"
                    ),
                }
            }
        });
    }
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
pub fn influx_target(cfg: &LeaseConfig) -> anyhow::Result<Target> {
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
