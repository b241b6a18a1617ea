//! Reloading the outlet's config without a restart (`SIGHUP`).
//!
//! The `[[service]]` tables are read again and take effect at once. New streams and UDP flows
//! see the new services and `allow` expressions; the relay is told the new service list;
//! end-to-end connections that the new config no longer allows (their service removed, or
//! their inlet no longer admitted by its `allow`) are closed, and the others keep going.
//!
//! The `[influxdb-outlet]` section's lease profiles (`[[influxdb-outlet.profile]]`, or the
//! section's own `leased-token-permissions`, `leased-token-expires-in` and `hand-out` when it
//! has none) are validated exactly as at start and put into the running lease manager (see
//! [`lease_profiles`] and [`LeaseManager::set_profiles`](crate::lease::LeaseManager::set_profiles)): new leases use them at once; a live
//! lease whose client now selects another profile, none, or the same one with other
//! permissions or lifetime is revoked (audit `reason = "profile_changed"`) and its subscribed
//! client is streamed a lease of its new profile; the others keep their credential. The
//! section's other keys (`to`, `tls`, `tls-ca`, `allow`, `org-id`, `all-access-token`, `api`,
//! `inject-at`), and adding, removing or renaming the section, take a restart: the running
//! ones stay and the log says so. A change of `api` or `org-id` keeps the running profiles too,
//! as the new ones were checked against the other API.
//!
//! Anything invalid in the new config (a service, an `allow`, a profile) refuses the whole
//! reload: the error is logged and the config in force stays.

use crate::config::{allows, influxdb_rule, targets, udp_targets, OutletConfig};
use crate::lease::{Api, InjectAt, LeaseConfig, Profile};
use crate::serve::Services;
use anyhow::Context;
use postern_proto::name::ServiceName;
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

/// The running `[influxdb-outlet]` section: what a reload compares the new one with.
pub struct RunningLeases {
    /// Its service name.
    pub service: ServiceName,
    /// The validated section the lease manager started with.
    pub config: LeaseConfig,
    pub inject_at: InjectAt,
}

/// The lease profiles of `cfg`'s `[influxdb-outlet]` section for the running lease manager,
/// the section validated exactly as at start: an invalid one is an error, and the reload is
/// refused. `None` when they cannot be put in force: the section was removed or renamed
/// ([`services_from`] logs that), or its `api` or `org-id` changed. Changed keys that take a
/// restart are logged.
pub fn lease_profiles(
    cfg: &OutletConfig,
    running: &RunningLeases,
) -> anyhow::Result<Option<Vec<Arc<Profile>>>> {
    let Some((name, section)) = &cfg.influxdb else {
        return Ok(None);
    };
    let new = section.validate().context("[influxdb-outlet]")?;
    influxdb_rule(section)?;
    if *name != running.service {
        return Ok(None);
    }
    let old = &running.config;
    let mut restart = Vec::new();
    if new.url != old.url {
        restart.push("to/tls");
    }
    if new.tls_ca != old.tls_ca {
        restart.push("tls-ca");
    }
    if new.allow != old.allow {
        restart.push("allow");
    }
    if new.admin.expose() != old.admin.expose() {
        restart.push("all-access-token");
    }
    if section.inject_at != running.inject_at {
        restart.push("inject-at");
    }
    let other_api = new.api != old.api || new.org_id != old.org_id;
    if new.api != old.api {
        restart.push("api");
    }
    if new.org_id != old.org_id {
        restart.push("org-id");
    }
    if !restart.is_empty() {
        tracing::warn!(
            keys = ?restart,
            "[influxdb-outlet] keys changed that take a restart; the running ones stay"
        );
    }
    if other_api {
        let api = match old.api {
            Api::V1 => "v1",
            Api::V2 => "v2",
        };
        tracing::warn!(
            running_api = api,
            "the lease profiles are not reloaded: they were checked for another API or              organization than the running one"
        );
        return Ok(None);
    }
    Ok(Some(new.profiles()))
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

#[cfg(test)]
mod lease_tests {
    use super::*;
    use crate::lease::InfluxdbOutletConfig;

    fn section(admin: &std::path::Path, org: &str, analysts: &str) -> InfluxdbOutletConfig {
        toml::from_str(&format!(
            r#"
to = "http://127.0.0.1:8086"
api = "v1"
org-id = "{org}"
allow = "*"
all-access-token = "file:{}"

[[profile]]
name = "analysts"
when = '{analysts}'
leased-token-permissions = '[{{"action":"read","resource":{{"type":"databases","name":"t"}}}}]'
"#,
            admin.display()
        ))
        .expect("section")
    }

    fn outlet(influx: InfluxdbOutletConfig) -> OutletConfig {
        use clap::Parser;
        #[derive(Parser)]
        struct Cmd {
            #[command(flatten)]
            run: crate::config::RunArgs,
        }
        let argv = [
            "outlet",
            "--relay",
            "127.0.0.1:4433",
            "--service",
            "e=127.0.0.1:7",
        ];
        let mut cfg = Cmd::parse_from(argv).run.resolve().expect("config");
        cfg.influxdb = Some((ServiceName::new("influxdb").expect("name"), influx));
        cfg
    }

    #[test]
    fn profiles_are_validated_as_at_start_and_kept_across_an_org_change() {
        let dir = tempfile::tempdir().expect("tempdir");
        let admin = dir.path().join("admin");
        std::fs::write(&admin, "admin:secret").expect("write");
        let start = section(&admin, "0123456789abcdef", r#"role = "analyst""#);
        let running = RunningLeases {
            service: ServiceName::new("influxdb").expect("name"),
            config: start.validate().expect("valid"),
            inject_at: start.inject_at,
        };
        let wider = outlet(section(
            &admin,
            "0123456789abcdef",
            r#"role = "analyst" or role = "ops""#,
        ));
        let got = lease_profiles(&wider, &running)
            .expect("valid")
            .expect("put in force");
        assert_eq!(got.len(), 1);
        let ops: postern_proto::policy::Attributes = [("role".to_owned(), "ops".to_owned())]
            .into_iter()
            .collect();
        assert!(got[0].when.eval(&ops), "the new `when` is the one returned");
        // A bad `when` is the same error as at start, naming the profile.
        let bad = lease_profiles(
            &outlet(section(&admin, "0123456789abcdef", "role = ")),
            &running,
        )
        .expect_err("refused");
        let text = format!("{bad:#}");
        assert!(text.contains("analysts") && text.contains("when"), "{text}");
        // Profiles checked for another organization (or API) are not put into the running
        // manager.
        let other = outlet(section(&admin, "fedcba9876543210", r#"role = "analyst""#));
        assert!(lease_profiles(&other, &running).expect("valid").is_none());
        // Without the section (or renamed) nothing is reloaded.
        let mut none = wider;
        none.influxdb = None;
        assert!(lease_profiles(&none, &running).expect("fine").is_none());
    }
}
