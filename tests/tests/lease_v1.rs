//! The lease manager against a real InfluxDB 1.x (`influxd` with `auth-enabled = true`): a
//! leased user can do exactly what its permissions grant; after revocation or expiry the user
//! is gone and its password refused; crashes at every step leave nothing behind after a
//! restart.

use postern_net::runtime::clock::now_ms;
use postern_outlet::lease::{
    Api, CrashAt, CrashPoint, InfluxdbOutletConfig, LeaseConfig, LeaseError, LeaseManager,
    ProfileConfig, SecretRef, StartOptions,
};
use postern_proto::lease::{Credential, LeaseGrant};
use postern_proto::name::NodeName;
use postern_proto::policy::Attributes;
use postern_tests::influxd::{Influxd, InfluxdOptions, Reply};
use postern_tests::wait::eventually;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(20);

const READ_WRITE_TELEGRAF: &str = r#"[
  {"action":"write","resource":{"type":"buckets","name":"telegraf"}},
  {"action":"read","resource":{"type":"buckets","name":"telegraf"}}
]"#;
const READ_TELEGRAF: &str =
    r#"[{"action":"read","resource":{"type":"databases","name":"telegraf"}}]"#;

fn client(name: &str) -> NodeName {
    NodeName::new(name).expect("node name")
}

struct Setup {
    influxd: Influxd,
    dir: tempfile::TempDir,
}

impl Setup {
    async fn new() -> Setup {
        let influxd = Influxd::start(InfluxdOptions { auth: true })
            .await
            .expect("start influxd");
        influxd
            .query("CREATE DATABASE telegraf")
            .await
            .expect("create db");
        influxd
            .query("CREATE DATABASE other")
            .await
            .expect("create db");
        let admin = (influxd.admin_user(), influxd.admin_password());
        let r = influxd
            .write_as(Some(admin), "other", "secret_metric value=42i 1")
            .await
            .expect("write");
        assert_eq!(r.status, 204, "{}", r.body);
        Setup {
            influxd,
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    fn state_dir(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn config_with(&self, ttl_s: u64, perms: &str, admin: &str) -> LeaseConfig {
        let secret = self.dir.path().join("admin");
        std::fs::write(&secret, admin).expect("write secret");
        InfluxdbOutletConfig {
            to: self.influxd.http_addr().to_string(),
            tls: false,
            tls_ca: None,
            allow: None,
            org_id: None,
            all_access_token: SecretRef::new(format!("file:{}", secret.display())),
            leased_token_expires_in: ttl_s,
            leased_token_permissions: perms.into(),
            api: Api::V1,
            inject_at: Default::default(),
            hand_out: false,
            profile: Vec::new(),
        }
        .validate()
        .expect("valid config")
    }

    fn config(&self, ttl_s: u64, perms: &str) -> LeaseConfig {
        let admin = format!(
            "{}:{}",
            self.influxd.admin_user(),
            self.influxd.admin_password()
        );
        self.config_with(ttl_s, perms, &admin)
    }

    async fn start(
        &self,
        cfg: LeaseConfig,
        state: &str,
        crash_at: Option<CrashAt>,
    ) -> Arc<LeaseManager> {
        LeaseManager::start_with(
            cfg,
            &self.state_dir(state),
            CancellationToken::new(),
            StartOptions {
                backend: None,
                crash_at,
            },
        )
        .await
        .expect("start lease manager")
    }

    async fn leased_users(&self) -> Vec<String> {
        self.influxd
            .users()
            .await
            .expect("SHOW USERS")
            .into_iter()
            .filter(|u| u.starts_with("postern_"))
            .collect()
    }

    /// Every leased user in influxd belongs to a live, active lease of `mgr`.
    async fn assert_no_credential_without_live_lease(&self, mgr: &LeaseManager) {
        let leases = mgr.list().await.expect("list");
        let now = now_ms();
        for u in self.leased_users().await {
            let ok = leases.iter().any(|l| {
                l.state == "active"
                    && l.expires_at_ms > now
                    && l.backend_id.as_deref() == Some(u.as_str())
            });
            assert!(ok, "user {u} has no live lease; leases: {leases:?}");
        }
    }
}

fn basic(g: &LeaseGrant) -> (String, String) {
    match &g.credential {
        Credential::Basic { username, password } => (username.clone(), password.clone()),
        Credential::Token(_) => panic!("v1 leases are users"),
    }
}

fn denied(r: &Reply) -> bool {
    r.status == 403 || r.error().is_some_and(|e| e.contains("not authorized"))
}

#[tokio::test]
async fn leased_user_gets_exactly_its_grants_and_is_dropped_on_revoke() {
    let s = Setup::new().await;
    let mgr = s.start(s.config(60, READ_WRITE_TELEGRAF), "st", None).await;
    let g = mgr.create(&client("inlet-a")).await.expect("create");
    let (user, pass) = basic(&g);
    assert!(user.starts_with(&format!("postern_{}_", mgr.instance_id())));
    assert!(s.leased_users().await.contains(&user));
    let auth = Some((user.as_str(), pass.as_str()));

    // Its own database: write and read.
    let w = s
        .influxd
        .write_as(auth, "telegraf", "cpu,host=a value=1i 1000000000")
        .await
        .expect("write");
    assert_eq!(w.status, 204, "{}", w.body);
    let q = s
        .influxd
        .query_as(auth, Some("telegraf"), "SELECT value FROM cpu")
        .await
        .expect("query");
    assert_eq!(q.status, 200, "{}", q.body);
    assert_eq!(q.error(), None, "{}", q.body);
    assert!(q.body.contains("\"cpu\""), "{}", q.body);

    // Another database: neither.
    let w = s
        .influxd
        .write_as(auth, "other", "cpu value=1i 1")
        .await
        .expect("write");
    assert!(denied(&w), "write to other: {} {}", w.status, w.body);
    let q = s
        .influxd
        .query_as(auth, Some("other"), "SELECT * FROM secret_metric")
        .await
        .expect("query");
    assert!(denied(&q), "read other: {} {}", q.status, q.body);
    assert!(
        q.json().pointer("/results/0/series").is_none(),
        "no data from other: {}",
        q.body
    );
    // Nor admin statements.
    let q = s
        .influxd
        .query_as(
            auth,
            None,
            "CREATE USER evil WITH PASSWORD 'x' WITH ALL PRIVILEGES",
        )
        .await
        .expect("query");
    assert!(denied(&q), "admin statement: {} {}", q.status, q.body);

    let grants = s
        .influxd
        .query(&format!("SHOW GRANTS FOR \"{user}\""))
        .await
        .expect("grants");
    let grants = grants.to_string();
    assert!(
        grants.contains("telegraf") && grants.contains("ALL PRIVILEGES"),
        "{grants}"
    );
    assert!(!grants.contains("other"), "{grants}");

    mgr.revoke(&g.lease_id).await.expect("revoke");
    assert!(!s.leased_users().await.contains(&user), "user dropped");
    let q = s
        .influxd
        .query_as(auth, Some("telegraf"), "SELECT value FROM cpu")
        .await
        .expect("query");
    assert_eq!(q.status, 401, "{}", q.body);
    mgr.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn read_only_lease_cannot_write() {
    let s = Setup::new().await;
    let mgr = s.start(s.config(60, READ_TELEGRAF), "st", None).await;
    let g = mgr.create(&client("inlet-b")).await.expect("create");
    let (user, pass) = basic(&g);
    let auth = Some((user.as_str(), pass.as_str()));
    let w = s
        .influxd
        .write_as(auth, "telegraf", "cpu value=1i 1")
        .await
        .expect("write");
    assert!(denied(&w), "read-only lease wrote: {} {}", w.status, w.body);
    let q = s
        .influxd
        .query_as(auth, Some("telegraf"), "SHOW MEASUREMENTS")
        .await
        .expect("query");
    assert_eq!(q.status, 200, "{}", q.body);
    assert_eq!(q.error(), None, "{}", q.body);
    let q = s
        .influxd
        .query_as(auth, Some("other"), "SELECT * FROM secret_metric")
        .await
        .expect("query");
    assert!(denied(&q), "read other: {} {}", q.status, q.body);
    mgr.shutdown().await.expect("shutdown");
    assert!(s.leased_users().await.is_empty(), "shutdown drops the user");
}

#[tokio::test]
async fn expired_lease_user_is_dropped_and_password_refused() {
    let s = Setup::new().await;
    let mgr = s.start(s.config(2, READ_WRITE_TELEGRAF), "st", None).await;
    let g = mgr.create(&client("inlet-c")).await.expect("create");
    let (user, pass) = basic(&g);
    eventually(WAIT, "the expired user to be dropped", || async {
        !s.leased_users().await.contains(&user)
    })
    .await;
    assert!(now_ms() >= g.expires_at_ms, "dropped only at expiry");
    let q = s
        .influxd
        .query_as(Some((&user, &pass)), Some("telegraf"), "SHOW MEASUREMENTS")
        .await
        .expect("query");
    assert_eq!(q.status, 401, "{}", q.body);
    assert!(mgr.list().await.expect("list").is_empty());
    mgr.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn subscribed_client_is_rotated_and_old_user_dropped() {
    let s = Setup::new().await;
    let mgr = s.start(s.config(3, READ_WRITE_TELEGRAF), "st", None).await;
    let mut rx: watch::Receiver<Option<LeaseGrant>> =
        mgr.subscribe(&client("inlet-d")).expect("subscribe");
    let g1 = tokio::time::timeout(WAIT, rx.wait_for(Option::is_some))
        .await
        .expect("first grant in time")
        .expect("alive")
        .clone()
        .expect("grant");
    let g2 = tokio::time::timeout(
        WAIT,
        rx.wait_for(|g| g.as_ref().is_some_and(|g| g.lease_id != g1.lease_id)),
    )
    .await
    .expect("second grant in time")
    .expect("alive")
    .clone()
    .expect("grant");
    let (u1, p1) = basic(&g1);
    let (u2, p2) = basic(&g2);
    assert_ne!(u1, u2);
    eventually(WAIT, "the old user to be dropped", || async {
        !s.leased_users().await.contains(&u1)
    })
    .await;
    let old = s
        .influxd
        .write_as(Some((&u1, &p1)), "telegraf", "cpu value=1i 1")
        .await
        .expect("write");
    assert_eq!(old.status, 401, "{}", old.body);
    let new = s
        .influxd
        .write_as(Some((&u2, &p2)), "telegraf", "cpu value=2i 2")
        .await
        .expect("write");
    assert_eq!(new.status, 204, "{}", new.body);
    drop(rx);
    mgr.shutdown().await.expect("shutdown");
    assert!(s.leased_users().await.is_empty());
}

#[tokio::test]
async fn influxdb_errors_are_surfaced_and_nothing_is_left() {
    let s = Setup::new().await;
    let wrong = format!("{}:wrong-password-93be", s.influxd.admin_user());
    let mgr = s
        .start(s.config_with(60, READ_TELEGRAF, &wrong), "bad-admin", None)
        .await;
    let msg = mgr
        .create(&client("inlet-e"))
        .await
        .expect_err("wrong admin password")
        .to_string();
    assert!(msg.contains("all-access-token"), "{msg}");
    assert!(
        msg.contains("401") || msg.contains("authorization failed"),
        "{msg}"
    );
    assert!(!msg.contains("wrong-password-93be"), "{msg}");
    mgr.shutdown().await.expect("shutdown");

    let perms = r#"[{"action":"read","resource":{"type":"buckets","name":"no_such_db"}}]"#;
    let mgr = s.start(s.config(60, perms), "bad-db", None).await;
    let msg = mgr
        .create(&client("inlet-e"))
        .await
        .expect_err("grant on a missing database")
        .to_string();
    assert!(msg.contains("database not found"), "{msg}");
    assert!(msg.contains("leased-token-permissions"), "{msg}");
    assert!(s.leased_users().await.is_empty(), "half-made user dropped");
    assert!(mgr.list().await.expect("list").is_empty());
    mgr.shutdown().await.expect("shutdown");
}

/// Crash at each step of creation, renewal and revocation; a manager restarted on the same
/// state directory leaves no user without a live lease.
#[tokio::test]
async fn crash_at_each_step_then_restart_leaks_nothing() {
    let s = Setup::new().await;
    let cases = [
        (CrashPoint::CreateBeforeStore, 1, false),
        (CrashPoint::CreateAfterStore, 1, false),
        (CrashPoint::CreateAfterBackend, 1, false),
        (CrashPoint::CreateAfterActivate, 1, false),
        (CrashPoint::RevokeBeforeStore, 1, true),
        (CrashPoint::RevokeAfterStore, 1, true),
        (CrashPoint::RevokeAfterBackend, 1, true),
    ];
    for (i, (step, occurrence, during_revoke)) in cases.into_iter().enumerate() {
        let state = format!("st-{i}");
        let cfg = s.config(60, READ_WRITE_TELEGRAF);
        let mgr = s
            .start(
                cfg.clone(),
                &state,
                Some(CrashAt {
                    point: step,
                    occurrence,
                }),
            )
            .await;
        let err = if during_revoke {
            let g = mgr.create(&client("inlet-f")).await.expect("create");
            mgr.revoke(&g.lease_id).await.expect_err("crash")
        } else {
            mgr.create(&client("inlet-f")).await.expect_err("crash")
        };
        assert!(
            matches!(err, LeaseError::Crashed(s) if s == step),
            "{step:?}: {err}"
        );
        tokio::time::timeout(WAIT, mgr.closed())
            .await
            .expect("crashed manager closes its store");
        let after_crash = s.leased_users().await;

        let mgr = s.start(cfg, &state, None).await;
        s.assert_no_credential_without_live_lease(&mgr).await;
        let users = s.leased_users().await;
        match step {
            CrashPoint::CreateAfterActivate | CrashPoint::RevokeBeforeStore => {
                assert_eq!(users.len(), 1, "{step:?}: live lease kept")
            }
            _ => assert!(
                users.is_empty(),
                "{step:?}: crash left {after_crash:?}, restart left {users:?}"
            ),
        }
        mgr.shutdown().await.expect("shutdown");
        assert!(s.leased_users().await.is_empty(), "{step:?}");
    }

    // During renewal: the second creation for a subscribed client.
    let cfg = s.config(3, READ_WRITE_TELEGRAF);
    let mgr = s
        .start(
            cfg.clone(),
            "renewal",
            Some(CrashAt {
                point: CrashPoint::CreateAfterBackend,
                occurrence: 2,
            }),
        )
        .await;
    let _rx = mgr.subscribe(&client("inlet-g")).expect("subscribe");
    tokio::time::timeout(WAIT, mgr.closed())
        .await
        .expect("crash during renewal");
    assert_eq!(s.leased_users().await.len(), 2, "old and new users exist");
    let mgr = s.start(cfg, "renewal", None).await;
    s.assert_no_credential_without_live_lease(&mgr).await;
    eventually(
        WAIT,
        "the surviving lease to expire and be dropped",
        || async { s.leased_users().await.is_empty() },
    )
    .await;
    mgr.shutdown().await.expect("shutdown");
}

/// The real influxd 1.x says its version on `/ping`: `api = "v2"` is refused at start with
/// what to use instead.
#[tokio::test]
async fn v2_against_the_real_1x_is_refused() {
    let s = Setup::new().await;
    let secret = s.dir.path().join("v2-admin");
    std::fs::write(&secret, "some-token").expect("write secret");
    let cfg = InfluxdbOutletConfig {
        to: s.influxd.http_addr().to_string(),
        tls: false,
        tls_ca: None,
        allow: None,
        org_id: Some("0123456789abcdef".into()),
        all_access_token: SecretRef::new(format!("file:{}", secret.display())),
        leased_token_expires_in: 60,
        leased_token_permissions:
            r#"[{"action":"write","resource":{"type":"buckets","name":"telegraf"}}]"#.into(),
        api: Api::V2,
        inject_at: Default::default(),
        hand_out: false,
        profile: Vec::new(),
    }
    .validate()
    .expect("valid v2 config");
    let err = match LeaseManager::start(cfg, &s.state_dir("v2"), CancellationToken::new()).await {
        Err(e) => e.to_string(),
        Ok(_) => panic!("api = \"v2\" started against InfluxDB 1.x"),
    };
    assert!(
        err.contains("version 1.") && err.contains("api = \"v1\""),
        "{err}"
    );
}

/// Lease profiles, chosen by a client's attributes, against the real influxd: a sensor's
/// leased user may write `telegraf` only and lives the sensor profile's 3 s (renewed with the
/// same profile); an analyst's may read and not write and lives its profile's hour; a client
/// that matches no profile gets no user at all.
#[tokio::test]
async fn profiles_choose_grants_and_lifetime_by_attributes() {
    let s = Setup::new().await;
    let admin = s.dir.path().join("admin-profiles");
    std::fs::write(
        &admin,
        format!("{}:{}", s.influxd.admin_user(), s.influxd.admin_password()),
    )
    .expect("write secret");
    let profile = |name: &str, when: &str, perms: &str, ttl_s: u64| ProfileConfig {
        name: name.into(),
        when: when.into(),
        leased_token_permissions: perms.into(),
        leased_token_expires_in: Some(ttl_s),
        hand_out: false,
    };
    let cfg = InfluxdbOutletConfig {
        to: s.influxd.http_addr().to_string(),
        tls: false,
        tls_ca: None,
        allow: None,
        org_id: None,
        all_access_token: SecretRef::new(format!("file:{}", admin.display())),
        leased_token_expires_in: 60,
        leased_token_permissions: String::new(),
        api: Api::V1,
        inject_at: Default::default(),
        hand_out: false,
        profile: vec![
            profile(
                "sensors",
                r#"role = "sensor""#,
                r#"[{"action":"write","resource":{"type":"databases","name":"telegraf"}}]"#,
                3,
            ),
            profile("analysts", r#"role = "analyst""#, READ_TELEGRAF, 3600),
        ],
    }
    .validate()
    .expect("valid config with profiles");
    let mgr = s.start(cfg, "st", None).await;
    let attrs = |role: &str| -> Attributes { [("role".to_owned(), role.to_owned())].into() };
    let first = |mut rx: watch::Receiver<Option<LeaseGrant>>| async move {
        let g = tokio::time::timeout(WAIT, rx.wait_for(Option::is_some))
            .await
            .expect("a grant in time")
            .expect("alive")
            .clone()
            .expect("grant");
        (rx, g)
    };

    let before = now_ms();
    let (mut sensor_rx, sensor) = first(
        mgr.subscribe_as(&client("sensor-1"), &attrs("sensor"))
            .expect("sensor subscribes"),
    )
    .await;
    let (analyst_rx, analyst) = first(
        mgr.subscribe_as(&client("analyst-1"), &attrs("analyst"))
            .expect("analyst subscribes"),
    )
    .await;
    let after = now_ms();
    // Each lease lives its profile's lifetime, not the section's 60 s.
    assert!(
        (before + 3_000..=after + 3_000).contains(&sensor.expires_at_ms),
        "sensor expiry {} not 3 s after {before}..{after}",
        sensor.expires_at_ms
    );
    assert!(
        (before + 3_600_000..=after + 3_600_000).contains(&analyst.expires_at_ms),
        "analyst expiry {} not 1 h after {before}..{after}",
        analyst.expires_at_ms
    );

    // The sensor writes telegraf, and neither reads it nor writes elsewhere.
    let (su, sp) = basic(&sensor);
    let sensor_auth = Some((su.as_str(), sp.as_str()));
    let w = s
        .influxd
        .write_as(sensor_auth, "telegraf", "temp,dev=s1 value=20i 1000000000")
        .await
        .expect("write");
    assert_eq!(w.status, 204, "sensor writes telegraf: {}", w.body);
    let w = s
        .influxd
        .write_as(sensor_auth, "other", "temp value=1i 1")
        .await
        .expect("write");
    assert!(denied(&w), "sensor writes other: {} {}", w.status, w.body);
    let q = s
        .influxd
        .query_as(sensor_auth, Some("telegraf"), "SELECT value FROM temp")
        .await
        .expect("query");
    assert!(denied(&q), "sensor reads telegraf: {} {}", q.status, q.body);

    // The analyst reads what the sensor wrote, and may not write.
    let (au, ap) = basic(&analyst);
    let analyst_auth = Some((au.as_str(), ap.as_str()));
    let q = s
        .influxd
        .query_as(analyst_auth, Some("telegraf"), "SELECT value FROM temp")
        .await
        .expect("query");
    assert_eq!(q.error(), None, "analyst reads telegraf: {}", q.body);
    assert!(q.body.contains("\"temp\""), "{}", q.body);
    let w = s
        .influxd
        .write_as(analyst_auth, "telegraf", "temp value=1i 2")
        .await
        .expect("write");
    assert!(denied(&w), "analyst writes: {} {}", w.status, w.body);

    // Nothing matches an admin-role client: no lease, no user.
    let users = s.leased_users().await;
    match mgr.subscribe_as(&client("intruder"), &attrs("admin")) {
        Err(LeaseError::NoProfile(who)) => assert_eq!(who, client("intruder")),
        other => panic!("a client matching no profile subscribed: {other:?}"),
    }
    match mgr.create_as(&client("intruder"), &attrs("admin")).await {
        Err(LeaseError::NoProfile(_)) => {}
        other => panic!("a client matching no profile got a lease: {other:?}"),
    }
    assert_eq!(s.leased_users().await, users);

    // Each lease's record names its profile; the sensor's renewal keeps it and its lifetime.
    let renewed = tokio::time::timeout(
        WAIT,
        sensor_rx.wait_for(|g| g.as_ref().is_some_and(|g| g.lease_id != sensor.lease_id)),
    )
    .await
    .expect("renewal in time")
    .expect("alive")
    .clone()
    .expect("grant");
    let leases = mgr.list().await.expect("list");
    let profile_of = |id: &str| {
        leases
            .iter()
            .find(|l| l.lease_id == id)
            .and_then(|l| l.profile.clone())
    };
    assert_eq!(profile_of(&renewed.lease_id).as_deref(), Some("sensors"));
    assert_eq!(profile_of(&analyst.lease_id).as_deref(), Some("analysts"));
    let shown = mgr.show(&renewed.lease_id).await.expect("show");
    assert_eq!(shown.profile.as_deref(), Some("sensors"));
    assert_eq!(
        shown.expires_at_ms - shown.created_at_ms,
        3_000,
        "the renewal lives the profile's 3 s"
    );
    assert!(leases.iter().all(|l| l.client != "intruder"), "{leases:?}");
    drop((sensor_rx, analyst_rx));
    mgr.shutdown().await.expect("shutdown");
    assert!(s.leased_users().await.is_empty());
}
