//! Starting a relay from its resolved config, as `postern-relay run` does: certificates and
//! keys read from files, the QUIC relay bound with its TLS/TCP fallback, the public ingress,
//! admin API and metrics endpoint started where configured, and everything served until
//! `shutdown` (then drained and stopped).

use crate::admin;
use crate::authority::Authority;
use crate::config::RelayConfig;
use crate::fleet::embedded::Embedded;
use crate::fleet::etcd::Etcd;
use crate::fleet::{FleetState, Member};
use crate::public::{PublicIngress, PublicOptions};
use crate::server::{Relay, RelayHandle, RelayOptions};
use crate::state::StateDir;
use anyhow::Context;
use postern_proto::tls;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Runs the relay `cfg` describes until `shutdown` is cancelled, then drains (up to its drain
/// timeout) and stops everything it started.
pub async fn run(cfg: RelayConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    run_with_reload(cfg, shutdown, None).await
}

pub use crate::reload::Reread;

/// [`run`], and on each `SIGHUP` or admin API `POST /v1/reload` the `[[policy]]` and
/// `log-level` of `reread()` are put in force (see [`crate::reload`]); a config that does not
/// read or validate is refused, the error logged (and answered), and the one in force stays.
pub async fn run_with_reload(
    cfg: RelayConfig,
    shutdown: CancellationToken,
    reread: Option<Reread>,
) -> anyhow::Result<()> {
    let state = StateDir::new(&cfg.state_dir);
    // Keys, tickets and identities live here: made 0700, or tightened if an older install or a
    // hand-made directory left it open to other users.
    postern_net::runtime::files::private_dir(state.root())?;
    let cert = postern_net::runtime::files::read(&cfg.cert)?;
    let key = postern_net::runtime::files::read(&cfg.key)?;
    let ca_pem = postern_net::runtime::files::read(&cfg.ca)?;
    // Send the CA with our certificate: enrolling nodes pin it by fingerprint.
    let chain = format!("{}\n{}", cert.trim_end(), ca_pem);
    let identity = tls::Identity::from_pem(&chain, &key)
        .with_context(|| format!("relay certificate {}", cfg.cert.display()))?;
    let roots = tls::roots_from_pem(&ca_pem)
        .with_context(|| format!("CA certificate {}", cfg.ca.display()))?;
    let authority = if state.ca_key().exists() {
        Some(Arc::new(Authority::new(state.clone())))
    } else {
        tracing::info!("no CA key in the state directory: this relay does not enroll nodes");
        None
    };
    // In a fleet the identities and revocations are etcd's; the state directory keeps the
    // CA key (and this relay's own files) only.
    let fleet: Arc<dyn FleetState> = match &cfg.cluster {
        Some(cluster) => Arc::new(
            Etcd::connect(cluster, Some(state.clone()))
                .await
                .context("cluster")?,
        ),
        None => Arc::new(Embedded::new(authority.clone(), Some(state.clone()))),
    };
    let mut relay = Relay::bind(RelayOptions {
        listen: cfg.listen,
        identity,
        roots,
        reset_key: Some(state.reset_key()?),
        tap: None,
        policy: cfg.policy.clone(),
        authority: authority.filter(|_| cfg.cluster.is_none()),
        forward_threads: cfg.forward_threads,
    })?;
    relay.set_drain_timeout(cfg.drain_timeout);
    let snapshot = fleet
        .snapshot()
        .await
        .with_context(|| format!("reading the shared state from {}", fleet.describe()))?;
    tracing::info!(state = %fleet.describe(), authority = fleet.runs_authority(), "shared state");
    let member = member(&cfg, relay.local_addr()?);
    relay.set_fleet(fleet, snapshot, member);
    if let Some(addr) = cfg.tcp_listen {
        match relay.listen_tcp(addr) {
            Ok(bound) => tracing::info!(%bound, "TLS/TCP fallback enabled"),
            Err(e) if !cfg.tcp_listen_explicit => tracing::warn!(
                error = %e,
                "no TLS/TCP fallback: its default address is taken (set `tcp-listen` to \
                 another address, or `off`); nodes that cannot use UDP will not reach this relay"
            ),
            Err(e) => return Err(e.into()),
        }
    }
    let public_stop = CancellationToken::new();
    if let Some((addr, domain)) = cfg.public.clone() {
        relay.set_public_certs(crate::server::public_cert::PublicCerts {
            domain: domain.trim_end_matches('.').to_ascii_lowercase(),
            validity: cfg.public_cert_validity,
        });
        let opts = PublicOptions::new(addr, domain);
        let ingress = PublicIngress::bind(opts)
            .await
            .with_context(|| format!("public ingress: cannot bind TCP {addr}"))?;
        tokio::spawn(ingress.run(relay.handle(), public_stop.clone()));
    }
    let ops_stop = CancellationToken::new();
    let reloader = reread.map(|r| Arc::new(crate::reload::Reloader::new(r, relay.handle())));
    if let Some(addr) = cfg.admin_addr {
        let explicit = cfg.admin_addr_explicit;
        let (handle, drain) = (relay.handle(), cfg.drain_timeout);
        start_admin(
            &cfg.state_dir,
            addr,
            explicit,
            handle,
            drain,
            reloader.clone(),
            ops_stop.clone(),
        )
        .await?;
    }
    if let Some(addr) = cfg.metrics_addr {
        let listener = postern_net::runtime::ops::bind(addr).await?;
        let recorder = postern_net::runtime::ops::recorder().map_err(anyhow::Error::msg)?;
        tokio::spawn(postern_net::runtime::ops::serve(
            listener,
            Arc::new(relay.handle()),
            Some(recorder),
            ops_stop.clone(),
        ));
    }
    if let Some(reloader) = reloader {
        let mut hups = postern_net::runtime::signal::hangups(shutdown.clone());
        tokio::spawn(async move {
            while hups.recv().await.is_some() {
                // Refusals are logged by the reloader.
                let r = reloader.clone();
                let _ = tokio::task::spawn_blocking(move || r.reload("SIGHUP")).await;
            }
        });
    }
    relay.run(shutdown).await;
    public_stop.cancel();
    ops_stop.cancel();
    Ok(())
}

/// How this relay registers in the fleet: its `cluster` name (else host name and port) and
/// advertised addresses (else the address it listens on).
fn member(cfg: &RelayConfig, bound: SocketAddr) -> Member {
    let cluster = cfg.cluster.as_ref();
    let name = cluster.and_then(|c| c.name.clone()).unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "relay".into());
        format!("{host}:{}", bound.port())
    });
    let addresses = match cluster.map(|c| c.advertise.clone()) {
        Some(a) if !a.is_empty() => a,
        _ => vec![bound.to_string()],
    };
    Member {
        name,
        addresses,
        load: Default::default(),
        updated_at_ms: 0,
    }
}

/// Starts the admin API. The default address being taken (say, a second relay on this host)
/// only turns the API off with a warning; an address asked for must work.
async fn start_admin(
    state_dir: &Path,
    addr: SocketAddr,
    explicit: bool,
    handle: RelayHandle,
    drain_timeout: Duration,
    reloader: Option<Arc<crate::reload::Reloader>>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let listener = match admin::bind(addr).await {
        Ok(l) => l,
        Err(e) if !explicit => {
            tracing::warn!(error = %e, "admin API off: its default address is taken; pass --admin-addr");
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };
    if !addr.ip().is_loopback() {
        tracing::warn!(%addr, "the admin API listens beyond loopback over plain HTTP (--admin-allow-remote)");
    }
    let token = admin::AdminToken::load_or_create(&state_dir.join(admin::TOKEN_FILE))?;
    let mut api = admin::AdminApi::new(handle, token, drain_timeout);
    if let Some(r) = reloader {
        api = api.with_reloader(r);
    }
    tokio::spawn(admin::serve(listener, Arc::new(api), stop));
    Ok(())
}
