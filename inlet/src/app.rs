//! Starting an inlet from its merged configuration: the one entry the binary (and anything
//! else that runs an inlet as the binary would) calls.

use crate::config::InletConfig;
use crate::listen::InletService;
use crate::node::{Inlet, InletOptions};
use tokio_util::sync::CancellationToken;

/// Runs an inlet as configured until `shutdown`, then drains and stops: takes the state
/// directory's lock, loads (or first prepares) the identity, binds the listeners, serves
/// `/metrics` when asked, and renews the certificate when it was enrolled.
pub async fn run(cfg: InletConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
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
    for relay in
        postern_net::transport::relay_path::resolve_relays(more_relays, &settings.relay_name)
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
    inlet.run(shutdown).await;
    ops_stop.cancel();
    tracing::info!("inlet stopped");
    Ok(())
}
