//! An outlet whose `influxdb` service hands out leased InfluxDB 1.x users, as the browser and
//! client tests need it.

use crate::influxd::Influxd;
use crate::kit::{start_outlet_with, svc, OutletNode, Pki};
use postern_outlet::lease::{InfluxdbOutletConfig, LeaseManager};
use postern_outlet::serve::Services;
use postern_outlet::target::Target;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// An outlet "outlet-1" serving `influxdb` at `target` (influxd itself, or a web front before
/// it), with a v1 lease manager for `influxd` granting read+write on the `leased` database for
/// `ttl_s` seconds; its state lives in `state`.
pub async fn leased_outlet(
    pki: &Pki,
    relay: SocketAddr,
    influxd: &Influxd,
    target: SocketAddr,
    state: &Path,
    ttl_s: u64,
    shutdown: CancellationToken,
) -> (OutletNode, Arc<LeaseManager>) {
    let (services, manager) = leased_services(influxd, target, state, ttl_s, shutdown).await;
    (
        start_outlet_with(pki, "outlet-1", relay, services).await,
        manager,
    )
}

/// The services of [`leased_outlet`], for an outlet started some other way.
pub async fn leased_services(
    influxd: &Influxd,
    target: SocketAddr,
    state: &Path,
    ttl_s: u64,
    shutdown: CancellationToken,
) -> (Services, Arc<LeaseManager>) {
    let admin = state.join("admin-credential");
    std::fs::write(
        &admin,
        format!("{}:{}", influxd.admin_user(), influxd.admin_password()),
    )
    .expect("write admin credential");
    let toml = format!(
        r#"
to = "{url}"
api = "v1"
all-access-token = "file:{admin}"
leased-token-expires-in = {ttl_s}
leased-token-permissions = '[{{"action":"read","resource":{{"type":"buckets","name":"leased"}}}},{{"action":"write","resource":{{"type":"buckets","name":"leased"}}}}]'
"#,
        url = influxd.url(),
        admin = admin.display(),
    );
    let cfg: InfluxdbOutletConfig = toml::from_str(&toml).expect("lease config");
    let cfg = cfg.validate().expect("valid lease config");
    let manager = LeaseManager::start(cfg, state, shutdown)
        .await
        .expect("start lease manager");
    let mut services = Services::default();
    services
        .targets
        .insert(svc("influxdb"), Target::tcp(target.to_string()));
    services.leases.insert(svc("influxdb"), manager.clone());
    (services, manager)
}
