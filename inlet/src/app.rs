//! Starting an inlet from its merged configuration: the one entry the binary (and anything
//! else that runs an inlet as the binary would) calls.

use crate::config::InletConfig;
use crate::listen::InletService;
use crate::node::{Inlet, InletOptions, ListenerSpec};
use tokio_util::sync::CancellationToken;

/// Runs an inlet as configured until `shutdown`, then drains and stops: takes the state
/// directory's lock, loads (or first prepares) the identity, binds the listeners, serves
/// `/metrics` when asked, and renews the certificate when it was enrolled.
pub async fn run(cfg: InletConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    run_with_reload(cfg, shutdown, None).await
}

/// Reads the configuration again (the binary: the same command line and config file).
pub type Reread = Box<dyn Fn() -> anyhow::Result<InletConfig> + Send + Sync>;

/// The listeners `cfg` asks for, TLS acceptors loaded.
fn listener_specs(cfg: &InletConfig) -> anyhow::Result<Vec<ListenerSpec>> {
    cfg.services
        .iter()
        .map(|s| {
            Ok(ListenerSpec {
                service: InletService {
                    name: s.name.clone(),
                    listen: s.listen,
                    kind: s.kind,
                },
                udp_idle: s.udp_idle()?,
                tls: match s.tls_files()? {
                    Some((cert, key)) => Some(crate::tls::acceptor(cert, key)?),
                    None => None,
                },
            })
        })
        .collect()
}

/// [`run`], and on each `SIGHUP` the listeners of `reread()` are put in force (see
/// [`Inlet::set_reloads`]); a config that does not read or validate is refused, the error
/// logged, and the listeners in force stay.
pub async fn run_with_reload(
    cfg: InletConfig,
    shutdown: CancellationToken,
    reread: Option<Reread>,
) -> anyhow::Result<()> {
    let recorder =
        postern_net::runtime::ops::recorder_if_asked(cfg.metrics_addr, crate::metrics::describe)
            .map_err(anyhow::Error::msg)?;
    // Held until the process ends: a second inlet on this identity is refused here.
    let _lock = postern_net::runtime::state_lock::lock(&cfg.state_dir, "inlet")?;
    let Some(settings) =
        postern_net::node_config::prepare(cfg.node.clone(), &cfg.state_dir, "inlet", &shutdown)
            .await?
    else {
        tracing::info!("stopped before enrolling");
        return Ok(());
    };
    let (relay, identity, roots) = settings.load()?;
    let first = relay.addr;
    let mut inlet = Inlet::bind(InletOptions {
        relay,
        identity,
        roots,
        services: cfg
            .services
            .iter()
            .filter(|s| s.protocol == postern_proto::udp::Protocol::Tcp)
            .map(|s| InletService {
                name: s.name.clone(),
                listen: s.listen,
                kind: s.kind,
            })
            .collect(),
    })
    .await?;
    for s in &cfg.services {
        if let Some((cert, key)) = s.tls_files()? {
            inlet.set_tls(&s.name, crate::tls::acceptor(cert, key)?);
        }
    }
    for s in &cfg.services {
        if let Some(idle) = s.udp_idle()? {
            inlet.bind_udp(s.name.clone(), s.listen, idle).await?;
        }
    }
    if let Some(reread) = reread {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        inlet.set_reloads(rx);
        let mut hups = postern_net::runtime::signal::hangups(shutdown.clone());
        tokio::spawn(async move {
            while hups.recv().await.is_some() {
                tracing::info!("SIGHUP: reloading the config");
                tracing::debug!("rereading the command line and config file");
                let reread = reread().and_then(|c| {
                    let specs = listener_specs(&c)?;
                    // Checked when the config was read: fails only if logging cannot change.
                    if let Some(level) = &c.log_level {
                        postern_net::runtime::logging::set_filter(level)?;
                    }
                    Ok((specs, c.log_level))
                });
                match reread {
                    Ok((specs, log_level)) => {
                        let n = specs.len();
                        if tx.send(specs).await.is_err() {
                            return;
                        }
                        tracing::info!(listeners = n, log_level, "config reloaded");
                    }
                    Err(e) => tracing::error!(
                        error = format!("{e:#}"),
                        "reload refused: the new config is invalid; the one in force stays"
                    ),
                }
            }
        });
    }
    inlet.set_drain_timeout(cfg.drain_timeout);
    if let Some(max) = cfg.max_connections {
        inlet.set_max_connections(max);
    }
    inlet.set_transport(cfg.transport.clone());
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
        inlet.add_relay(relay);
    }
    let ops_stop = CancellationToken::new();
    postern_net::runtime::ops::serve_if_asked(
        cfg.metrics_addr,
        std::sync::Arc::new(inlet.handle()),
        recorder,
        ops_stop.clone(),
    )
    .await?;
    inlet
        .handle()
        .renew_automatically(&cfg.state_dir, &settings.cert, shutdown.clone());
    // `postern-inlet lease create|show` reaches this process here (see `crate::admin`).
    let admin_path = crate::admin::socket_path(&cfg.state_dir);
    match crate::admin::bind(&admin_path) {
        Ok(listener) => {
            let (handle, stop) = (inlet.handle(), ops_stop.clone());
            tokio::spawn(async move {
                crate::admin::serve(handle, listener, &admin_path, stop).await;
            });
        }
        Err(e) => tracing::warn!(
            error = %e,
            "cannot open the inlet's admin socket: `postern-inlet lease` cannot reach this inlet"
        ),
    }
    inlet.run(shutdown).await;
    ops_stop.cancel();
    tracing::info!("inlet stopped");
    Ok(())
}
