//! The lease manager against the InfluxDB 2 contract server (`postern_tests::influx2`):
//! create, use, rotate, revoke; error bodies surfaced; crash safety; the admin socket; and no
//! secret in the logs.

use postern_net::runtime::clock::now_ms;
use postern_outlet::admin_socket;
use postern_outlet::lease::admin::{self, Request, Response};
use postern_outlet::lease::{
    Api, CrashAt, CrashPoint, InfluxdbOutletConfig, LeaseConfig, LeaseError, LeaseManager,
    ProfileConfig, SecretRef, StartOptions,
};
use postern_proto::lease::{Credential, LeaseGrant};
use postern_proto::name::NodeName;
use postern_proto::policy::Attributes;
use postern_tests::influx2::{Authorization, Flavor, Influx2, Influx2Options, Injection};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(20);

const PERMS: &str = r#"[
  {"action":"write","resource":{"type":"buckets","name":"telegraf","orgID":"INFLUX_ORG_ID"}},
  {"action":"read","resource":{"type":"buckets","name":"telegraf","orgID":"INFLUX_ORG_ID"}}
]"#;

/// Every bucket of the org, on purpose.
const ALL_BUCKETS: &str =
    r#"[{"action":"write","resource":{"type":"buckets","orgID":"INFLUX_ORG_ID","all":true}}]"#;

fn client(name: &str) -> NodeName {
    NodeName::new(name).expect("node name")
}

struct Setup {
    server: Influx2,
    dir: tempfile::TempDir,
}

impl Setup {
    async fn new() -> Setup {
        Setup::flavor(Flavor::Oss27).await
    }

    async fn flavor(flavor: Flavor) -> Setup {
        Setup {
            server: Influx2::start(Influx2Options {
                flavor,
                ..Influx2Options::default()
            })
            .await
            .expect("contract server"),
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    /// Neither the outlet's requests nor the server's answers strayed from the published
    /// contract.
    fn assert_contract_kept(&self) {
        let v = self.server.contract_violations();
        assert!(v.is_empty(), "contract violations: {v:#?}");
    }

    async fn try_start(&self, cfg: LeaseConfig) -> Result<Arc<LeaseManager>, LeaseError> {
        LeaseManager::start(cfg, &self.state_dir(), CancellationToken::new()).await
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
            hand_out: false,
            profile: Vec::new(),
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
    s.assert_contract_kept();
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

    // An organization that does not exist (permissions that need no bucket lookup, so that
    // the manager starts and the token API itself answers).
    let cfg = s.config_with(60, ALL_BUCKETS, s.server.admin_token(), "0000000000000001");
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
        r#"[{"action":"write","resource":{"type":"bukkits","all":true}}]"#,
        s.server.admin_token(),
        &s.server.org_id(),
    );
    let mgr = s.start(cfg, None).await;
    let msg = mgr
        .create(&client("inlet-c"))
        .await
        .expect_err("bad permission")
        .to_string();
    assert!(
        msg.contains("invalid resource type for permission"),
        "{msg}"
    );
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
    // The misspelt type was sent on purpose; it is the only thing off the contract.
    let v = s.server.contract_violations();
    assert!(
        !v.is_empty() && v.iter().all(|e| e.contains("bukkits")),
        "{v:#?}"
    );
}

/// Crash at each step of creation and revocation; a manager restarted on the same state
/// directory leaves no credential without a live lease, and revokes everything at shutdown.
#[tokio::test]
async fn crash_at_each_step_then_restart_leaks_nothing() {
    let steps = [
        (CrashPoint::CreateBeforeStore, false),
        (CrashPoint::CreateAfterStore, false),
        (CrashPoint::CreateAfterBackend, false),
        (CrashPoint::CreateAfterActivate, false),
        (CrashPoint::RevokeBeforeStore, true),
        (CrashPoint::RevokeAfterStore, true),
        (CrashPoint::RevokeAfterBackend, true),
    ];
    for (step, during_revoke) in steps {
        let s = Setup::new().await;
        let mgr = s
            .start(
                s.config(60),
                Some(CrashAt {
                    point: step,
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
            CrashPoint::CreateAfterActivate | CrashPoint::RevokeBeforeStore => {
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
                point: CrashPoint::CreateAfterBackend,
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
    let listener = admin_socket::bind(&path).expect("bind admin socket");
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
            attrs: Default::default(),
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

fn resource_ids(a: &Authorization) -> Vec<Option<String>> {
    a.permissions
        .iter()
        .map(|p| p["resource"]["id"].as_str().map(str::to_owned))
        .collect()
}

/// A bucket named by `name` is scoped by its id, looked up for every lease: the token works on
/// that bucket and no other, follows a bucket re-made under the same name, and a bucket that
/// is gone is an error naming it.
#[tokio::test]
async fn name_scoped_bucket_is_resolved_to_its_id() {
    let s = Setup::new().await;
    let mgr = s.start(s.config(60), None).await;
    let g = mgr.create(&client("inlet-n")).await.expect("create");
    let a = s.server.authorizations();
    let telegraf = s.server.bucket_id("telegraf").expect("bucket");
    assert_eq!(resource_ids(&a[0]), vec![Some(telegraf.clone()); 2]);
    assert_eq!(s.write(&g.credential, "telegraf", "cpu v=1i 1").await, 204);
    assert_eq!(s.write(&g.credential, "other", "cpu v=1i 1").await, 403);
    assert_eq!(s.query(&g.credential, "other").await.0, 403);

    // Re-made under the same name: the next lease follows the new id.
    let new_id = s.server.make_bucket("telegraf");
    assert_ne!(new_id, telegraf);
    let g2 = mgr.create(&client("inlet-n")).await.expect("create");
    let a2 = s
        .server
        .authorizations()
        .into_iter()
        .find(|a| a.description.contains(&g2.lease_id))
        .expect("second authorization");
    assert_eq!(resource_ids(&a2), vec![Some(new_id); 2]);

    // Gone: a clear error that names it, and nothing made.
    s.server.delete_bucket("telegraf");
    let before = s.server.authorizations().len();
    let msg = mgr
        .create(&client("inlet-n"))
        .await
        .expect_err("bucket gone")
        .to_string();
    assert!(
        msg.contains("\"telegraf\"") && msg.contains("does not exist"),
        "{msg}"
    );
    assert_eq!(s.server.authorizations().len(), before);
    assert_eq!(
        mgr.list().await.expect("list").len(),
        2,
        "no record left behind"
    );
    mgr.shutdown().await.expect("shutdown");
    s.assert_contract_kept();
}

#[tokio::test]
async fn missing_bucket_stops_the_start() {
    let s = Setup::new().await;
    let perms = r#"[{"action":"write","resource":{"type":"buckets","name":"nope"}}]"#;
    let cfg = s.config_with(60, perms, s.server.admin_token(), &s.server.org_id());
    let err = match s.try_start(cfg).await {
        Err(e) => e.to_string(),
        Ok(_) => panic!("started with a bucket that does not exist"),
    };
    assert!(
        err.contains("\"nope\"") && err.contains("does not exist"),
        "{err}"
    );
    assert!(err.contains("leased-token-permissions"), "{err}");
}

/// The admin token's kind decides what it may grant; each refusal points at what to change.
#[tokio::test]
async fn admin_token_refusals_point_the_right_way() {
    let s = Setup::new().await;
    let org = s.server.org_id();
    let telegraf = s.server.bucket_id("telegraf").expect("bucket");
    let p = |action: &str, rtype: &str, org: Option<&str>, id: Option<&str>| {
        let mut r = serde_json::json!({ "type": rtype });
        if let Some(o) = org {
            r["orgID"] = serde_json::json!(o);
        }
        if let Some(i) = id {
            r["id"] = serde_json::json!(i);
        }
        serde_json::json!({ "action": action, "resource": r })
    };

    // A custom token that may create authorizations and write the bucket, but has no
    // permission on its own user.
    let custom = s.server.custom_token(vec![
        p("read", "authorizations", Some(&org), None),
        p("write", "authorizations", Some(&org), None),
        p("read", "buckets", Some(&org), None),
        p("write", "buckets", Some(&org), None),
    ]);
    let mgr = s.start(s.config_with(60, PERMS, &custom, &org), None).await;
    let msg = mgr
        .create(&client("inlet-t"))
        .await
        .expect_err("no users")
        .to_string();
    assert!(msg.contains("401") && msg.contains("write:users/"), "{msg}");
    assert!(msg.contains("use an all-access or operator token"), "{msg}");
    assert!(!msg.contains(&custom), "{msg}");
    mgr.shutdown().await.expect("shutdown");

    // A token that holds write on one bucket only cannot grant write on every bucket.
    let narrow = s.server.custom_token(vec![
        p("write", "authorizations", Some(&org), None),
        p("read", "authorizations", Some(&org), None),
        p("write", "users", None, Some(&s.server.user_id())),
        p("read", "users", None, Some(&s.server.user_id())),
        p("write", "buckets", Some(&org), Some(&telegraf)),
    ]);
    let mgr = s
        .start(s.config_with(60, ALL_BUCKETS, &narrow, &org), None)
        .await;
    let msg = mgr
        .create(&client("inlet-t"))
        .await
        .expect_err("wider")
        .to_string();
    assert!(
        msg.contains("403") && msg.contains("is not allowed"),
        "{msg}"
    );
    assert!(
        msg.contains("more than the all-access-token holds"),
        "{msg}"
    );
    mgr.shutdown().await.expect("shutdown");

    // An all-access token is scoped to its org: another org id is refused, with a hint at
    // org-id rather than at the token.
    let all_access = s.server.all_access_token();
    let mgr = s
        .start(
            s.config_with(60, ALL_BUCKETS, &all_access, "00000000000000f1"),
            None,
        )
        .await;
    let msg = mgr
        .create(&client("inlet-t"))
        .await
        .expect_err("other org")
        .to_string();
    assert!(
        msg.contains("401") && msg.contains("/authorizations is unauthorized"),
        "{msg}"
    );
    assert!(msg.contains("check that org-id"), "{msg}");
    mgr.shutdown().await.expect("shutdown");

    // And in its own org it leases exactly what is asked.
    let mgr = s
        .start(s.config_with(60, PERMS, &all_access, &org), None)
        .await;
    let g = mgr
        .create(&client("inlet-t"))
        .await
        .expect("all-access leases");
    assert_eq!(s.write(&g.credential, "telegraf", "cpu v=1i 1").await, 204);
    assert_eq!(s.write(&g.credential, "other", "cpu v=1i 1").await, 403);
    mgr.shutdown().await.expect("shutdown");
    s.assert_contract_kept();
}

/// OSS 2.7 shows token values in listings, 2.9 and Cloud do not; leases work on all three,
/// and Cloud refuses resource types it does not have.
#[tokio::test]
async fn flavours_list_and_lease_as_the_real_servers() {
    for (flavor, shows) in [
        (Flavor::Oss27, true),
        (Flavor::Oss29, false),
        (Flavor::Cloud, false),
    ] {
        let s = Setup::flavor(flavor).await;
        let mgr = s.start(s.config(60), None).await;
        let g = mgr.create(&client("inlet-f")).await.expect("create");
        let Credential::Token(token) = &g.credential else {
            panic!("v2 gives tokens");
        };
        assert_eq!(token.len(), 88, "{flavor:?}: tokens are 64 bytes of base64");
        assert_eq!(s.write(&g.credential, "telegraf", "cpu v=1i 1").await, 204);
        let listed: serde_json::Value = reqwest::Client::new()
            .get(format!("{}/api/v2/authorizations", s.server.url()))
            .header("Authorization", format!("Token {}", s.server.admin_token()))
            .send()
            .await
            .expect("list")
            .json()
            .await
            .expect("json");
        let ours = listed["authorizations"]
            .as_array()
            .expect("list")
            .iter()
            .find(|a| {
                a["description"]
                    .as_str()
                    .is_some_and(|d| d.contains(&g.lease_id))
            })
            .expect("listed")
            .clone();
        assert_eq!(ours.get("token").is_some(), shows, "{flavor:?}: {ours}");
        assert_eq!(
            ours["permissions"][0]["resource"]["name"], "telegraf",
            "name shown from id"
        );
        mgr.shutdown().await.expect("shutdown");
        assert!(s.server.authorizations().is_empty(), "{flavor:?}");
        s.assert_contract_kept();
    }

    let s = Setup::flavor(Flavor::Cloud).await;
    let perms = r#"[{"action":"read","resource":{"type":"instance","all":true}}]"#;
    let mgr = s
        .start(
            s.config_with(60, perms, s.server.admin_token(), &s.server.org_id()),
            None,
        )
        .await;
    let msg = mgr
        .create(&client("inlet-f"))
        .await
        .expect_err("no instance on Cloud")
        .to_string();
    assert!(msg.contains("invalid resource type"), "{msg}");
    assert!(msg.contains("leased-token-permissions"), "{msg}");
    mgr.shutdown().await.expect("shutdown");
}

/// A 404 that is not InfluxDB's "authorization not found" (a proxy's) does not count as
/// revoked: the lease stays recorded and the revocation is retried until the real one.
#[tokio::test]
async fn a_proxy_404_is_not_a_revocation() {
    let s = Setup::new().await;
    let mgr = s.start(s.config(60), None).await;
    let g = mgr.create(&client("inlet-p")).await.expect("create");
    s.server.inject(Injection {
        method: "DELETE".into(),
        path_prefix: "/api/v2/authorizations/".into(),
        status: 404,
        headers: Vec::new(),
        content_type: "text/html".into(),
        body: "<html><body><h1>404 Not Found</h1>nginx</body></html>".into(),
        times: 1,
    });
    let msg = mgr
        .revoke(&g.lease_id)
        .await
        .expect_err("not revoked")
        .to_string();
    assert!(
        msg.contains("404") && msg.contains("not InfluxDB's"),
        "{msg}"
    );
    assert_eq!(s.server.authorizations().len(), 1, "the token still exists");
    assert_eq!(s.write(&g.credential, "telegraf", "cpu v=1i 1").await, 204);
    let leases = mgr.list().await.expect("list");
    assert!(
        leases.iter().any(|l| l.lease_id == g.lease_id),
        "still recorded: {leases:?}"
    );
    // The retry reaches InfluxDB and deletes it.
    s.server
        .wait_for_authorizations(WAIT, |a| a.is_empty())
        .await
        .expect("revoked by the retry");
    assert_eq!(s.write(&g.credential, "telegraf", "cpu v=1i 2").await, 401);
    mgr.shutdown().await.expect("shutdown");
}

/// When DELETE is refused (a gateway allowing no DELETE), the token is deactivated instead.
#[tokio::test]
async fn refused_delete_falls_back_to_deactivation() {
    let s = Setup::new().await;
    let mgr = s.start(s.config(60), None).await;
    let g = mgr.create(&client("inlet-q")).await.expect("create");
    s.server.inject(Injection {
        method: "DELETE".into(),
        path_prefix: "/api/v2/authorizations/".into(),
        status: 405,
        headers: Vec::new(),
        content_type: "application/json; charset=utf-8".into(),
        body: r#"{"code":"method not allowed","message":"DELETE is not allowed here"}"#.into(),
        times: usize::MAX,
    });
    mgr.revoke(&g.lease_id)
        .await
        .expect("revoked by deactivation");
    let a = s.server.authorizations();
    assert_eq!(a.len(), 1);
    assert_eq!(a[0].status, "inactive");
    assert_eq!(s.write(&g.credential, "telegraf", "cpu v=1i 1").await, 401);
    assert!(s
        .server
        .requests()
        .iter()
        .any(|r| r.method == "PATCH" && r.status == 200));
    mgr.shutdown().await.expect("shutdown");
    // A restart does not take the inactive token for a stray one to revoke again.
    let patches = |s: &Setup| {
        s.server
            .requests()
            .iter()
            .filter(|r| r.method == "PATCH")
            .count()
    };
    let before = patches(&s);
    let mgr = s.start(s.config(60), None).await;
    mgr.shutdown().await.expect("shutdown");
    assert_eq!(patches(&s), before);
    s.assert_contract_kept();
}

#[tokio::test]
async fn retry_after_is_honoured_on_429() {
    let s = Setup::new().await;
    let mgr = s.start(s.config(60), None).await;
    s.server.inject(Injection {
        method: "POST".into(),
        path_prefix: "/api/v2/authorizations".into(),
        status: 429,
        headers: vec![("Retry-After".into(), "1".into())],
        content_type: "application/json; charset=utf-8".into(),
        body: r#"{"code":"too many requests","message":"rate limited"}"#.into(),
        times: 1,
    });
    let g = mgr
        .create(&client("inlet-r"))
        .await
        .expect("created after waiting");
    assert_eq!(s.write(&g.credential, "telegraf", "cpu v=1i 1").await, 204);
    let posts: Vec<_> = s
        .server
        .requests()
        .into_iter()
        .filter(|r| r.method == "POST" && r.path == "/api/v2/authorizations")
        .collect();
    assert_eq!(posts.len(), 2, "{posts:?}");
    assert_eq!(posts[0].status, 429);
    assert!(
        posts[1].at.duration_since(posts[0].at) >= Duration::from_millis(950),
        "waited {:?}",
        posts[1].at.duration_since(posts[0].at)
    );
    mgr.shutdown().await.expect("shutdown");
}

/// `api = "v1"` cannot lease anything from InfluxDB 2: refused at start with what to use.
#[tokio::test]
async fn v1_against_a_2x_server_is_refused() {
    let s = Setup::new().await;
    let secret = s.dir.path().join("v1-admin");
    std::fs::write(&secret, "admin:pw").expect("write");
    let cfg = InfluxdbOutletConfig {
        to: s.server.url(),
        tls: false,
        tls_ca: None,
        allow: None,
        org_id: None,
        all_access_token: SecretRef::new(format!("file:{}", secret.display())),
        leased_token_expires_in: 60,
        leased_token_permissions:
            r#"[{"action":"write","resource":{"type":"buckets","name":"telegraf"}}]"#.into(),
        api: Api::V1,
        inject_at: Default::default(),
        hand_out: false,
        profile: Vec::new(),
    }
    .validate()
    .expect("valid v1 config");
    let err = match s.try_start(cfg).await {
        Err(e) => e.to_string(),
        Ok(_) => panic!("v1 started against InfluxDB 2"),
    };
    assert!(
        err.contains("v2.7") && err.contains("api = \"v2\""),
        "{err}"
    );
    assert!(err.contains("DBRP"), "{err}");
}

/// Lease profiles against the InfluxDB 2 contract server: each client's authorization carries
/// its profile's permissions (bucket looked up by name) and its lease the profile's lifetime
/// (in the authorization's description too); a client matching no profile gets no
/// authorization; only a profile with `hand-out = true` hands a client its own token, which
/// `revoke` kills like any other.
#[tokio::test]
async fn profiles_choose_permissions_and_lifetime_and_hand_out() {
    let s = Setup::new().await;
    let secret = s.dir.path().join("admin-token");
    std::fs::write(&secret, s.server.admin_token()).expect("write secret");
    let profile =
        |name: &str, when: &str, action: &str, ttl_s: u64, hand_out: bool| ProfileConfig {
            name: name.into(),
            when: when.into(),
            leased_token_permissions: format!(
                r#"[{{"action":"{action}","resource":{{"type":"buckets","name":"telegraf"}}}}]"#
            ),
            leased_token_expires_in: Some(ttl_s),
            hand_out,
        };
    let cfg = InfluxdbOutletConfig {
        to: s.server.url(),
        tls: false,
        tls_ca: None,
        allow: None,
        org_id: Some(s.server.org_id()),
        all_access_token: SecretRef::new(format!("file:{}", secret.display())),
        leased_token_expires_in: 60,
        leased_token_permissions: String::new(),
        api: Api::V2,
        inject_at: Default::default(),
        hand_out: false,
        profile: vec![
            profile("sensors", r#"role = "sensor""#, "write", 900, false),
            profile("analysts", r#"role = "analyst""#, "read", 7200, true),
        ],
    }
    .validate()
    .expect("valid config with profiles");
    let mgr = s.start(cfg, None).await;
    let attrs = |role: &str| -> Attributes { [("role".to_owned(), role.to_owned())].into() };
    let telegraf = s.server.bucket_id("telegraf").expect("telegraf bucket");

    let before = now_ms();
    let mut sensor_rx = mgr
        .subscribe_as(&client("sensor-1"), &attrs("sensor"))
        .expect("subscribe");
    let mut analyst_rx = mgr
        .subscribe_as(&client("analyst-1"), &attrs("analyst"))
        .expect("subscribe");
    let sensor = next_grant(&mut sensor_rx, None).await;
    let analyst = next_grant(&mut analyst_rx, None).await;
    let after = now_ms();
    let auths = s.server.authorizations();
    for (grant, action, ttl_ms) in [(&sensor, "write", 900_000), (&analyst, "read", 7_200_000)] {
        assert!(
            (before + ttl_ms..=after + ttl_ms).contains(&grant.expires_at_ms),
            "{action}: expiry {} not {ttl_ms} ms after {before}..{after}",
            grant.expires_at_ms
        );
        let a = with_lease(&auths, &grant.lease_id).expect("authorization of the lease");
        assert_eq!(a.permissions.len(), 1, "{:?}", a.permissions);
        assert_eq!(a.permissions[0]["action"], action, "{:?}", a.permissions);
        assert_eq!(a.permissions[0]["resource"]["id"], telegraf.as_str());
        let expires = postern_outlet::lease::backend::format_rfc3339(grant.expires_at_ms);
        assert!(
            a.description.contains(&format!("expires={expires}")),
            "{}",
            a.description
        );
    }
    assert_eq!(
        s.write(&sensor.credential, "telegraf", "t v=1i 1").await,
        204
    );
    assert_eq!(s.query(&sensor.credential, "telegraf").await.0, 403);
    let (status, csv) = s.query(&analyst.credential, "telegraf").await;
    assert_eq!(status, 200);
    assert!(csv.contains("t v=1i 1"), "{csv}");
    assert_eq!(
        s.write(&analyst.credential, "telegraf", "t v=2i 2").await,
        403
    );

    // No profile: no authorization.
    let count = s.server.authorizations().len();
    assert!(matches!(
        mgr.subscribe_as(&client("intruder"), &attrs("admin")),
        Err(LeaseError::NoProfile(_))
    ));
    assert!(matches!(
        mgr.hand_out(&client("intruder"), &attrs("admin"), true)
            .await,
        Err(LeaseError::NoProfile(_))
    ));
    // A sensor's profile does not hand out.
    match mgr
        .hand_out(&client("sensor-1"), &attrs("sensor"), true)
        .await
    {
        Err(LeaseError::HandOutOff { profile, .. }) => assert_eq!(profile, "sensors"),
        other => panic!("the sensor profile handed out: {other:?}"),
    }
    assert_eq!(s.server.authorizations().len(), count);

    // An analyst's does: its own token, its profile's permissions, shown again until revoked.
    let me = client("analyst-1");
    assert!(matches!(
        mgr.hand_out(&me, &attrs("analyst"), false).await,
        Err(LeaseError::NoHandOut(_))
    ));
    let handed = mgr
        .hand_out(&me, &attrs("analyst"), true)
        .await
        .expect("hand-out");
    assert_eq!(handed.profile, "analysts");
    assert_ne!(handed.grant.lease_id, analyst.lease_id);
    assert_eq!(s.query(&handed.grant.credential, "telegraf").await.0, 200);
    assert_eq!(
        s.write(&handed.grant.credential, "telegraf", "t v=3i 3")
            .await,
        403
    );
    let again = mgr
        .hand_out(&me, &attrs("analyst"), false)
        .await
        .expect("show");
    assert_eq!(again.grant, handed.grant);
    let info = mgr.show(&handed.grant.lease_id).await.expect("show lease");
    assert!(info.handed_out && !info.current, "{info:?}");
    assert_eq!(info.profile.as_deref(), Some("analysts"));
    assert!(mgr.accepts(&me, handed.grant.credential.authorization().as_bytes()));
    mgr.revoke(&handed.grant.lease_id).await.expect("revoke");
    assert_eq!(s.query(&handed.grant.credential, "telegraf").await.0, 401);
    assert!(!mgr.accepts(&me, handed.grant.credential.authorization().as_bytes()));
    assert!(matches!(
        mgr.hand_out(&me, &attrs("analyst"), false).await,
        Err(LeaseError::NoHandOut(_))
    ));
    // The streamed lease is untouched.
    assert_eq!(s.query(&analyst.credential, "telegraf").await.0, 200);

    drop((sensor_rx, analyst_rx));
    mgr.shutdown().await.expect("shutdown");
    assert!(s.server.authorizations().is_empty());
    s.assert_contract_kept();
}
