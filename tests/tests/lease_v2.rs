//! The lease manager against the InfluxDB 2 contract server (`postern_tests::influx2`):
//! create, use, rotate, revoke; error bodies surfaced; crash safety; the admin socket; and no
//! secret in the logs.

use postern_outlet::lease::admin::{self, Request, Response};
use postern_outlet::lease::{
    Api, CrashAt, InfluxdbOutletConfig, LeaseConfig, LeaseError, LeaseManager, SecretRef,
    StartOptions, Step,
};
use postern_proto::lease::{Credential, LeaseGrant};
use postern_proto::name::NodeName;
use postern_tests::influx2::{Authorization, Influx2, Influx2Options};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(20);

const PERMS: &str = r#"[
  {"action":"write","resource":{"type":"buckets","name":"telegraf","orgID":"INFLUX_ORG_ID"}},
  {"action":"read","resource":{"type":"buckets","name":"telegraf","orgID":"INFLUX_ORG_ID"}}
]"#;

fn client(name: &str) -> NodeName {
    NodeName::new(name).expect("node name")
}

struct Setup {
    server: Influx2,
    dir: tempfile::TempDir,
}

impl Setup {
    async fn new() -> Setup {
        Setup {
            server: Influx2::start(Influx2Options::default())
                .await
                .expect("contract server"),
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    fn state_dir(&self) -> std::path::PathBuf {
        self.dir.path().join("state")
    }

    fn config_with(&self, ttl_s: u64, perms: &str, token: &str, org_id: &str) -> LeaseConfig {
        let secret = self.dir.path().join("admin-token");
        std::fs::write(&secret, format!("{token}\n")).expect("write secret");
        InfluxdbOutletConfig {
            to: self.server.url(),
            tls: false,
            tls_ca: None,
            allow: Some("role=influxdb-client".into()),
            org_id: Some(org_id.into()),
            all_access_token: SecretRef::new(format!("file:{}", secret.display())),
            leased_token_expires_in: ttl_s,
            leased_token_permissions: perms.into(),
            api: Api::V2,
            inject_at: Default::default(),
        }
        .validate()
        .expect("valid config")
    }

    fn config(&self, ttl_s: u64) -> LeaseConfig {
        self.config_with(
            ttl_s,
            PERMS,
            self.server.admin_token(),
            &self.server.org_id(),
        )
    }

    async fn start(&self, cfg: LeaseConfig, crash_at: Option<CrashAt>) -> Arc<LeaseManager> {
        LeaseManager::start_with(
            cfg,
            &self.state_dir(),
            CancellationToken::new(),
            StartOptions {
                backend: None,
                crash_at,
            },
        )
        .await
        .expect("start lease manager")
    }

    async fn write(&self, cred: &Credential, bucket: &str, line: &str) -> u16 {
        reqwest::Client::new()
            .post(format!(
                "{}/api/v2/write?org={}&bucket={bucket}",
                self.server.url(),
                self.server.org_name()
            ))
            .header("Authorization", cred.authorization())
            .body(line.to_owned())
            .send()
            .await
            .expect("write request")
            .status()
            .as_u16()
    }

    async fn query(&self, cred: &Credential, bucket: &str) -> (u16, String) {
        let r = reqwest::Client::new()
            .post(format!(
                "{}/api/v2/query?org={}",
                self.server.url(),
                self.server.org_name()
            ))
            .header("Authorization", cred.authorization())
            .header("Content-Type", "application/vnd.flux")
            .body(format!(r#"from(bucket: "{bucket}") |> range(start: 0)"#))
            .send()
            .await
            .expect("query request");
        (r.status().as_u16(), r.text().await.unwrap_or_default())
    }

    /// Every credential the server holds belongs to a live, active lease of `mgr`, recorded
    /// with that credential's id.
    async fn assert_no_credential_without_live_lease(&self, mgr: &LeaseManager) {
        let leases = mgr.list().await.expect("list");
        let now = now_ms();
        for a in self.server.authorizations() {
            let ok = leases.iter().any(|l| {
                l.state == "active"
                    && l.expires_at_ms > now
                    && l.backend_id.as_deref() == Some(a.id.as_str())
                    && a.description.contains(&l.lease_id)
            });
            assert!(
                ok,
                "authorization {} ({}) has no live lease; leases: {leases:?}",
                a.id, a.description
            );
        }
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

async fn next_grant(rx: &mut watch::Receiver<Option<LeaseGrant>>, not: Option<&str>) -> LeaseGrant {
    let got = tokio::time::timeout(
        WAIT,
        rx.wait_for(|g| g.as_ref().is_some_and(|g| Some(g.lease_id.as_str()) != not)),
    )
    .await
    .expect("a grant in time")
    .expect("manager alive");
    got.clone().expect("some grant")
}

fn with_lease<'a>(auths: &'a [Authorization], lease_id: &str) -> Option<&'a Authorization> {
    auths.iter().find(|a| a.description.contains(lease_id))
}

#[tokio::test]
async fn create_use_rotate_and_revoke() {
    let s = Setup::new().await;
    // TTL 6 s: renewal at 4 s, grace 2 s.
    let mgr = s.start(s.config(6), None).await;
    let mut rx = mgr.subscribe(&client("inlet-a")).expect("subscribe");

    let g1 = next_grant(&mut rx, None).await;
    assert!(matches!(g1.credential, Credential::Token(_)));
    let auths = s.server.authorizations();
    assert_eq!(auths.len(), 1);
    let a1 = with_lease(&auths, &g1.lease_id).expect("authorization for g1");
    assert!(
        a1.description.contains("client=inlet-a"),
        "{}",
        a1.description
    );
    assert!(a1
        .description
        .contains(&format!("outlet={}", mgr.instance_id())));
    assert_eq!(a1.org_id, s.server.org_id());
    assert_eq!(a1.permissions.len(), 2);
    assert_eq!(
        a1.permissions[0]["resource"]["orgID"],
        serde_json::json!(s.server.org_id()),
        "INFLUX_ORG_ID substituted"
    );

    // The leased token works for what it grants, and only that.
    assert_eq!(s.write(&g1.credential, "telegraf", "cpu v=1i 1").await, 204);
    let (status, csv) = s.query(&g1.credential, "telegraf").await;
    assert_eq!(status, 200);
    assert!(csv.contains("cpu v=1i 1"), "{csv}");
    assert_eq!(s.write(&g1.credential, "other", "cpu v=1i 1").await, 403);
    assert_eq!(s.query(&g1.credential, "other").await.0, 403);

    // Rotation: a new grant arrives before expiry; the old token keeps working during the
    // grace period and is deleted afterwards.
    let g2 = next_grant(&mut rx, Some(&g1.lease_id)).await;
    assert_ne!(g1.credential, g2.credential);
    assert!(g2.expires_at_ms > g1.expires_at_ms);
    assert!(
        now_ms() < g1.expires_at_ms,
        "the new lease arrived before the old one expired"
    );
    assert_eq!(s.write(&g2.credential, "telegraf", "cpu v=2i 2").await, 204);
    let g1_id = g1.lease_id.clone();
    s.server
        .wait_for_authorizations(WAIT, |a| with_lease(a, &g1_id).is_none())
        .await
        .expect("old authorization deleted");
    assert!(
        now_ms() <= g1.expires_at_ms + 2000,
        "old lease revoked by its expiry"
    );
    assert_eq!(s.write(&g1.credential, "telegraf", "cpu v=3i 3").await, 401);
    assert_eq!(s.write(&g2.credential, "telegraf", "cpu v=4i 4").await, 204);
    s.assert_no_credential_without_live_lease(&mgr).await;

    // Revoking the current lease by hand: the token dies at once, and the still-subscribed
    // client gets a new one.
    let info = mgr.show(&g2.lease_id).await.expect("show");
    assert!(info.current);
    mgr.revoke(&g2.lease_id).await.expect("revoke");
    assert_eq!(s.write(&g2.credential, "telegraf", "cpu v=5i 5").await, 401);
    assert!(matches!(
        mgr.show(&g2.lease_id).await,
        Err(LeaseError::NotFound(_))
    ));
    let g3 = next_grant(&mut rx, Some(&g2.lease_id)).await;
    assert_eq!(s.write(&g3.credential, "telegraf", "cpu v=6i 6").await, 204);

    drop(rx);
    mgr.shutdown().await.expect("clean shutdown");
    assert!(s.server.authorizations().is_empty(), "shutdown revokes all");
    assert!(matches!(mgr.list().await, Err(LeaseError::Closed)));
}

#[tokio::test]
async fn unsubscribed_lease_is_not_renewed_and_is_revoked_at_expiry() {
    let s = Setup::new().await;
    let mgr = s.start(s.config(2), None).await;
    let mut rx = mgr.subscribe(&client("inlet-b")).expect("subscribe");
    let g = next_grant(&mut rx, None).await;
    drop(rx);
    s.server
        .wait_for_authorizations(WAIT, |a| a.is_empty())
        .await
        .expect("revoked at expiry");
    assert!(now_ms() >= g.expires_at_ms, "not revoked before expiry");
    let posts = s
        .server
        .requests()
        .iter()
        .filter(|r| r.method == "POST" && r.path == "/api/v2/authorizations")
        .count();
    assert_eq!(posts, 1, "no renewal without subscribers");
    assert_eq!(s.write(&g.credential, "telegraf", "cpu v=1i 1").await, 401);
    assert!(mgr.list().await.expect("list").is_empty());
    mgr.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn influxdb_errors_are_surfaced_without_secrets() {
    let s = Setup::new().await;

    // An organization that does not exist.
    let cfg = s.config_with(60, PERMS, s.server.admin_token(), "0000000000000001");
    let mgr = s.start(cfg, None).await;
    let err = mgr.create(&client("inlet-c")).await.expect_err("bad org");
    let msg = err.to_string();
    assert!(msg.contains("unable to create token"), "{msg}");
    assert!(msg.contains("org-id"), "{msg}");
    assert!(msg.contains("400"), "{msg}");
    assert!(mgr.list().await.expect("list").is_empty(), "nothing left");
    mgr.shutdown().await.expect("shutdown");

    // A bad permission.
    let cfg = s.config_with(
        60,
        r#"[{"action":"write","resource":{"type":"bukkits"}}]"#,
        s.server.admin_token(),
        &s.server.org_id(),
    );
    let mgr = s.start(cfg, None).await;
    let msg = mgr
        .create(&client("inlet-c"))
        .await
        .expect_err("bad permission")
        .to_string();
    assert!(msg.contains("invalid resource type \"bukkits\""), "{msg}");
    assert!(msg.contains("leased-token-permissions"), "{msg}");
    mgr.shutdown().await.expect("shutdown");

    // An admin token InfluxDB does not know: the manager still starts (and keeps retrying the
    // reconciliation), and creation fails with a clear message that does not echo the token.
    let wrong = "not-the-admin-token-7f3a9c";
    let cfg = s.config_with(60, PERMS, wrong, &s.server.org_id());
    let mgr = s.start(cfg, None).await;
    let msg = mgr
        .create(&client("inlet-c"))
        .await
        .expect_err("unauthorized")
        .to_string();
    assert!(msg.contains("401"), "{msg}");
    assert!(msg.contains("unauthorized access"), "{msg}");
    assert!(msg.contains("all-access-token"), "{msg}");
    assert!(!msg.contains(wrong), "{msg}");
    assert!(!msg.contains(s.server.admin_token()), "{msg}");
    mgr.shutdown().await.expect("shutdown");
    assert!(s.server.authorizations().is_empty());
}

/// Crash at each step of creation and revocation; a manager restarted on the same state
/// directory leaves no credential without a live lease, and revokes everything at shutdown.
#[tokio::test]
async fn crash_at_each_step_then_restart_leaks_nothing() {
    let steps = [
        (Step::CreateBeforeStore, false),
        (Step::CreateAfterStore, false),
        (Step::CreateAfterBackend, false),
        (Step::CreateAfterActivate, false),
        (Step::RevokeBeforeStore, true),
        (Step::RevokeAfterStore, true),
        (Step::RevokeAfterBackend, true),
    ];
    for (step, during_revoke) in steps {
        let s = Setup::new().await;
        let mgr = s
            .start(
                s.config(60),
                Some(CrashAt {
                    step,
                    occurrence: 1,
                }),
            )
            .await;
        let err = if during_revoke {
            let g = mgr.create(&client("inlet-d")).await.expect("create");
            mgr.revoke(&g.lease_id).await.expect_err("crash")
        } else {
            mgr.create(&client("inlet-d")).await.expect_err("crash")
        };
        assert!(
            matches!(err, LeaseError::Crashed(s) if s == step),
            "{step:?}: {err}"
        );
        tokio::time::timeout(WAIT, mgr.closed())
            .await
            .expect("crashed manager closes its store");
        let left_by_crash = s.server.authorizations().len();

        let mgr = s.start(s.config(60), None).await;
        s.assert_no_credential_without_live_lease(&mgr).await;
        let leases = mgr.list().await.expect("list");
        match step {
            // A live lease whose record says active is kept until expiry.
            Step::CreateAfterActivate | Step::RevokeBeforeStore => {
                assert_eq!(leases.len(), 1, "{step:?}: {leases:?}");
                assert_eq!(s.server.authorizations().len(), 1, "{step:?}");
            }
            _ => {
                assert!(leases.is_empty(), "{step:?}: {leases:?}");
                assert!(
                    s.server.authorizations().is_empty(),
                    "{step:?}: crash left {left_by_crash}, restart left {:?}",
                    s.server.authorizations()
                );
            }
        }
        mgr.shutdown().await.expect("shutdown");
        assert!(s.server.authorizations().is_empty(), "{step:?}");
    }
}

/// A crash during renewal (the second creation for a subscribed client): after restart only
/// the still-live first lease remains.
#[tokio::test]
async fn crash_during_renewal_then_restart_leaks_nothing() {
    let s = Setup::new().await;
    let mgr = s
        .start(
            s.config(3),
            Some(CrashAt {
                step: Step::CreateAfterBackend,
                occurrence: 2,
            }),
        )
        .await;
    let mut rx = mgr.subscribe(&client("inlet-e")).expect("subscribe");
    let g1 = next_grant(&mut rx, None).await;
    tokio::time::timeout(WAIT, mgr.closed())
        .await
        .expect("crash during renewal");
    assert!(mgr.is_crashed());
    assert_eq!(s.server.authorizations().len(), 2, "both credentials exist");

    let mgr = s.start(s.config(3), None).await;
    s.assert_no_credential_without_live_lease(&mgr).await;
    let auths = s.server.authorizations();
    if now_ms() < g1.expires_at_ms {
        assert_eq!(auths.len(), 1);
        assert!(with_lease(&auths, &g1.lease_id).is_some());
    }
    // And the surviving lease is revoked at its expiry.
    s.server
        .wait_for_authorizations(WAIT, |a| a.is_empty())
        .await
        .expect("revoked at expiry");
    mgr.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn credentials_of_other_outlets_and_people_are_left_alone() {
    let s = Setup::new().await;
    let http = reqwest::Client::new();
    for description in [
        "postern lease 0123456789abcdef outlet=ffffffff client=x expires=2000-01-01T00:00:00Z",
        "grafana read token",
    ] {
        let r = http
            .post(format!("{}/api/v2/authorizations", s.server.url()))
            .header("Authorization", format!("Token {}", s.server.admin_token()))
            .json(&serde_json::json!({
                "orgID": s.server.org_id(),
                "description": description,
                "permissions": [{"action":"read","resource":{"type":"buckets"}}],
            }))
            .send()
            .await
            .expect("post");
        assert_eq!(r.status().as_u16(), 201);
    }
    let mgr = s.start(s.config(60), None).await;
    let g = mgr.create(&client("inlet-f")).await.expect("create");
    assert_eq!(s.server.authorizations().len(), 3);
    mgr.shutdown().await.expect("shutdown");
    let left: Vec<String> = s
        .server
        .authorizations()
        .into_iter()
        .map(|a| a.description)
        .collect();
    assert_eq!(left.len(), 2, "{left:?}");
    assert!(left.iter().all(|d| !d.contains(&g.lease_id)));
}

#[tokio::test]
async fn admin_socket_create_list_show_revoke() {
    let s = Setup::new().await;
    let mgr = s.start(s.config(60), None).await;
    let path = admin::socket_path(&s.state_dir());
    let stop = CancellationToken::new();
    let listener = admin::bind(&path).expect("bind admin socket");
    let server = tokio::spawn({
        let mgr = mgr.clone();
        let path = path.clone();
        let stop = stop.clone();
        async move { admin::serve_listener(mgr, listener, &path, stop).await }
    });
    let created = admin::client_request(
        &path,
        &Request::Create {
            client: client("inlet-g"),
        },
    )
    .await
    .ok();
    let Some(Response::Created { grant }) = created else {
        panic!("no create answer: {created:?}");
    };
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path)
            .expect("socket")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let Credential::Token(token) = &grant.credential else {
        panic!("v2 gives tokens");
    };
    assert!(Response::Created {
        grant: grant.clone()
    }
    .to_text()
    .contains(token.as_str()));
    assert_eq!(
        s.write(&grant.credential, "telegraf", "cpu v=1i 1").await,
        204
    );

    let Ok(Response::Leases { leases }) = admin::client_request(&path, &Request::List).await else {
        panic!("list");
    };
    assert_eq!(leases.len(), 1);
    assert_eq!(leases[0].lease_id, grant.lease_id);
    assert_eq!(leases[0].client, "inlet-g");
    let Ok(Response::Lease { lease }) = admin::client_request(
        &path,
        &Request::Show {
            lease_id: grant.lease_id.clone(),
        },
    )
    .await
    else {
        panic!("show");
    };
    assert_eq!(lease.state, "active");
    let r = admin::client_request(
        &path,
        &Request::Revoke {
            lease_id: grant.lease_id.clone(),
        },
    )
    .await
    .expect("revoke");
    assert_eq!(
        r,
        Response::Revoked {
            lease_id: grant.lease_id.clone()
        }
    );
    assert_eq!(
        s.write(&grant.credential, "telegraf", "cpu v=1i 2").await,
        401
    );
    let r = admin::client_request(
        &path,
        &Request::Show {
            lease_id: grant.lease_id.clone(),
        },
    )
    .await
    .expect("show");
    assert!(matches!(r, Response::Error { message } if message.contains("not found")));

    stop.cancel();
    server.await.expect("join");
    assert!(!path.exists(), "socket removed");
    mgr.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn a_second_manager_cannot_open_a_held_store() {
    let s = Setup::new().await;
    let mgr = s.start(s.config(60), None).await;
    let second = LeaseManager::start(s.config(60), &s.state_dir(), CancellationToken::new()).await;
    match second {
        Err(e) => assert!(e.to_string().contains("in use"), "{e}"),
        Ok(_) => panic!("second manager opened the same store"),
    }
    mgr.shutdown().await.expect("shutdown");
}

/// A writer for a tracing subscriber that keeps everything in memory.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// With every log level on, nothing logged contains the admin token or a leased token.
#[tokio::test(flavor = "current_thread")]
async fn logs_never_contain_secrets() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let s = Setup::new().await;
    let mgr = s.start(s.config(3), None).await;
    let mut rx = mgr.subscribe(&client("inlet-h")).expect("subscribe");
    let g1 = next_grant(&mut rx, None).await;
    let g2 = next_grant(&mut rx, Some(&g1.lease_id)).await;
    let manual = mgr.create(&client("inlet-i")).await.expect("create");
    let bad = s.config_with(3, PERMS, "wrong-admin-token-51c2", &s.server.org_id());
    drop(rx);
    mgr.shutdown().await.expect("shutdown");
    let mgr2 = s.start(bad, None).await;
    let _ = mgr2.create(&client("inlet-h")).await;
    mgr2.shutdown().await.expect("shutdown");

    let text =
        String::from_utf8_lossy(&captured.0.lock().unwrap_or_else(|p| p.into_inner())).into_owned();
    assert!(text.contains("lease issued"), "logging was captured");
    let mut secrets = vec![
        s.server.admin_token().to_owned(),
        "wrong-admin-token-51c2".to_owned(),
    ];
    for g in [&g1, &g2, &manual] {
        if let Credential::Token(t) = &g.credential {
            secrets.push(t.clone());
        }
    }
    for secret in secrets {
        assert!(!text.contains(&secret), "a secret appeared in the logs");
    }
}
