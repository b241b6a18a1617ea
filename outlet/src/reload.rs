//! Reloading the outlet's services without a restart (`SIGHUP`): the `[[service]]` tables are
//! read again and take effect at once. New streams and UDP flows see the new services and
//! `allow` expressions; the relay is told the new service list; end-to-end connections that
//! the new config no longer allows (their service removed, or their inlet no longer admitted by
//! its `allow`) are closed, and the others keep going. An `[influxdb-outlet]` and its leases
//! stay as they are (changing them needs a restart, and the log says so).

use crate::config::{allows, targets, udp_targets, OutletConfig};
use crate::serve::Services;
use std::sync::{Arc, RwLock};

/// The services in force, swapped whole on reload: each stream and flow takes the current
/// snapshot when it starts.
pub struct Live(RwLock<Arc<Services>>);

impl Live {
    pub fn new(services: Arc<Services>) -> Self {
        Self(RwLock::new(services))
    }

    /// The services in force now.
    pub fn get(&self) -> Arc<Services> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Puts `services` in force.
    pub fn set(&self, services: Arc<Services>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = services;
    }
}

/// The services of `cfg`, with the `[influxdb-outlet]` service of `old` kept as it runs (its
/// lease manager cannot be swapped). An error leaves nothing changed.
pub fn services_from(cfg: &OutletConfig, old: &Services) -> anyhow::Result<Services> {
    let mut new = Services {
        targets: targets(&cfg.services)?,
        leases: Default::default(),
        allow: allows(&cfg.services)?,
        inject_at: Default::default(),
        udp: udp_targets(&cfg.services)?,
    };
    let kept: Vec<_> = old.leases.keys().cloned().collect();
    for name in kept {
        if new.targets.contains_key(&name) || new.udp.contains_key(&name) {
            anyhow::bail!(
                "service {:?} is already the [influxdb-outlet] service; a [[service]] table cannot \
                 take its name",
                name.as_str()
            );
        }
        if let Some(t) = old.targets.get(&name) {
            new.targets.insert(name.clone(), t.clone());
        }
        if let Some(a) = old.allow.get(&name) {
            new.allow.insert(name.clone(), a.clone());
        }
        if let Some(m) = old.leases.get(&name) {
            new.leases.insert(name.clone(), m.clone());
        }
        new.inject_at.insert(name.clone(), old.inject_at(&name));
    }
    let influx_now = cfg.influxdb.as_ref().map(|(n, _)| n.clone());
    let influx_before: Vec<_> = old.leases.keys().cloned().collect();
    if influx_now.iter().cloned().collect::<Vec<_>>() != influx_before {
        tracing::warn!(
            "the [influxdb-outlet] section was added, removed or renamed: that takes a restart; \
             the running one stays as it is"
        );
    }
    Ok(new)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RunArgs;
    use crate::target::Target;
    use clap::Parser;
    use postern_proto::name::ServiceName;

    #[derive(Parser)]
    struct Cmd {
        #[command(flatten)]
        run: RunArgs,
    }

    fn cfg(services: &[&str]) -> OutletConfig {
        let mut argv = vec!["outlet", "--relay", "127.0.0.1:4433"];
        for s in services {
            argv.extend(["--service", s]);
        }
        Cmd::parse_from(argv).run.resolve().expect("valid config")
    }

    fn svc(s: &str) -> ServiceName {
        ServiceName::new(s).expect("name")
    }

    #[test]
    fn reloaded_services_replace_the_tables_whole() {
        let mut old = Services::default();
        old.targets
            .insert(svc("influxdb"), Target::tcp("127.0.0.1:8086"));
        old.targets.insert(svc("gone"), Target::tcp("127.0.0.1:1"));
        let rule = postern_proto::policy::Expr::parse("role = \"client\"").expect("expr");
        old.allow.insert(svc("influxdb"), rule);
        old.inject_at
            .insert(svc("influxdb"), crate::lease::InjectAt::Outlet);
        let new = services_from(
            &cfg(&[
                "echo=127.0.0.1:7,allow=name = \"a\"",
                "udp=127.0.0.1:8089,protocol=udp",
            ]),
            &old,
        )
        .expect("reload");
        assert_eq!(
            new.names(),
            vec![svc("echo"), svc("udp")],
            "the old tables are gone, the new ones in"
        );
        assert!(new.allow.contains_key(&svc("echo")));
        assert!(new.udp.contains_key(&svc("udp")));
        assert!(!new.targets.contains_key(&svc("gone")));
        // A bad expression is an error, not a half-applied reload.
        let bad = Cmd::parse_from([
            "outlet",
            "--relay",
            "127.0.0.1:4433",
            "--service",
            "echo=127.0.0.1:7,allow=name = ",
        ])
        .run
        .resolve()
        .and_then(|c| services_from(&c, &old));
        assert!(bad.is_err());
    }
}
