//! The manager against an in-memory backend: audit, retried revocations, shutdown and
//! start-up recovery.

use super::backend::{BoxFuture, CreateRequest, Created, Found};
use super::shared::lock;
use super::*;
use postern_proto::lease::Credential;
use postern_proto::name::NodeName;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// An in-memory backend whose revocations can be made to fail.
#[derive(Default)]
struct Fake {
    creds: Mutex<BTreeMap<String, String>>,
    fail_revoke: AtomicBool,
    revoke_attempts: AtomicU32,
    attempted: Notify,
}

impl Backend for Fake {
    fn create<'a>(
        &'a self,
        req: &'a CreateRequest,
    ) -> BoxFuture<'a, Result<Created, BackendError>> {
        Box::pin(async move {
            let id = format!("b-{}", req.lease_id);
            lock(&self.creds).insert(id.clone(), req.lease_id.clone());
            Ok(Created {
                backend_id: id,
                credential: Credential::Token(format!("tok-{}", req.lease_id)),
            })
        })
    }

    fn revoke<'a>(&'a self, backend_id: &'a str) -> BoxFuture<'a, Result<(), BackendError>> {
        Box::pin(async move {
            self.revoke_attempts.fetch_add(1, Ordering::SeqCst);
            self.attempted.notify_waiters();
            if self.fail_revoke.load(Ordering::SeqCst) {
                return Err(BackendError::Protocol {
                    op: "delete",
                    detail: "injected failure".into(),
                });
            }
            lock(&self.creds).remove(backend_id);
            Ok(())
        })
    }

    fn list_ours(&self) -> BoxFuture<'_, Result<Vec<Found>, BackendError>> {
        Box::pin(async move {
            Ok(lock(&self.creds)
                .iter()
                .map(|(id, lease)| Found {
                    backend_id: id.clone(),
                    lease_id: lease.clone(),
                    marker: String::new(),
                })
                .collect())
        })
    }
}

fn config(ttl_s: u64) -> LeaseConfig {
    LeaseConfig {
        url: reqwest::Url::parse("http://127.0.0.1:1").expect("url"),
        tls_ca: None,
        allow: None,
        org_id: Some("0123456789abcdef".into()),
        admin: Secret::new("unused"),
        ttl: Duration::from_secs(ttl_s),
        permissions: Vec::new(),
        api: Api::V2,
        hand_out: false,
        profiles: Vec::new(),
    }
}

async fn start(dir: &Path, fake: &Arc<Fake>, ttl_s: u64) -> Arc<LeaseManager> {
    LeaseManager::start_with(
        config(ttl_s),
        dir,
        CancellationToken::new(),
        StartOptions {
            backend: Some(fake.clone()),
            crash_at: None,
        },
    )
    .await
    .expect("start")
}

fn client() -> NodeName {
    NodeName::new("inlet-x").expect("name")
}

#[tokio::test]
async fn lease_lifecycle_is_audited_without_credentials() {
    use tracing_subscriber::layer::SubscriberExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let audit = dir.path().join("audit.jsonl");
    let layer = postern_net::runtime::logging::audit_layer(&audit).expect("audit layer");
    // A current-thread runtime: every task logs through this thread's subscriber.
    let _guard = tracing::subscriber::set_default(tracing_subscriber::registry().with(layer));
    // With a single scoped subscriber alive, tracing computes a callsite's interest from
    // the default of whichever thread hits it first, so a test running in parallel could
    // switch these events off for good; a second live dispatcher makes it ask every one.
    let _second = tracing::Dispatch::new(tracing_subscriber::registry());
    let fake = Arc::new(Fake::default());
    let mgr = start(dir.path(), &fake, 3600).await;
    let mut streamed = mgr.subscribe(&client()).expect("subscribe");
    tokio::time::timeout(Duration::from_secs(10), streamed.wait_for(|g| g.is_some()))
        .await
        .expect("lease in time")
        .expect("lease");
    let other = NodeName::new("inlet-y").expect("name");
    let by_hand = mgr.create(&other).await.expect("create");
    mgr.revoke(&by_hand.lease_id).await.expect("revoke");
    drop(streamed);
    mgr.shutdown().await.expect("shutdown revokes the rest");

    let text = std::fs::read_to_string(&audit).expect("audit log");
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    let count = |action: &str, client: &str| {
        lines
            .iter()
            .filter(|l| l["event"] == "lease" && l["action"] == action && l["client"] == client)
            .count()
    };
    assert_eq!(count("create", "inlet-x"), 1, "{text}");
    assert_eq!(count("create", "inlet-y"), 1, "{text}");
    assert_eq!(count("revoke", "inlet-x"), 1, "{text}");
    assert_eq!(count("revoke", "inlet-y"), 1, "{text}");
    assert!(
        !text.contains("tok-"),
        "a credential is in the audit log: {text}"
    );
}

#[tokio::test]
async fn failed_revocations_are_retried_and_never_forgotten() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fake = Arc::new(Fake::default());
    fake.fail_revoke.store(true, Ordering::SeqCst);
    let mgr = start(dir.path(), &fake, 2).await;
    let g = mgr.create(&client()).await.expect("create");
    // Wait for the revocation at expiry to fail, and for at least one retry.
    let wait = async {
        loop {
            let notified = fake.attempted.notified();
            if fake.revoke_attempts.load(Ordering::SeqCst) >= 2 {
                return;
            }
            notified.await;
        }
    };
    tokio::time::timeout(Duration::from_secs(20), wait)
        .await
        .expect("revocation retried");
    let info = mgr.show(&g.lease_id).await.expect("still recorded");
    assert_eq!(info.state, "revoking");
    assert!(info.revoke_failures >= 1, "{info:?}");
    assert_eq!(lock(&fake.creds).len(), 1);

    fake.fail_revoke.store(false, Ordering::SeqCst);
    let wait = async {
        loop {
            let notified = fake.attempted.notified();
            if lock(&fake.creds).is_empty() {
                return;
            }
            notified.await;
        }
    };
    tokio::time::timeout(Duration::from_secs(20), wait)
        .await
        .expect("revoked once the backend recovers");
    mgr.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn leases_not_revoked_at_shutdown_are_revoked_by_the_next_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fake = Arc::new(Fake::default());
    let mgr = start(dir.path(), &fake, 3600).await;
    mgr.create(&client()).await.expect("create");
    let mut rx = mgr.subscribe(&client()).expect("subscribe");
    tokio::time::timeout(Duration::from_secs(20), rx.wait_for(Option::is_some))
        .await
        .expect("subscribed lease made")
        .expect("alive");
    assert_eq!(lock(&fake.creds).len(), 2);
    fake.fail_revoke.store(true, Ordering::SeqCst);
    match mgr.shutdown().await {
        Err(LeaseError::Unrevoked(2)) => {}
        other => panic!("expected 2 unrevoked leases, got {other:?}"),
    }
    assert_eq!(lock(&fake.creds).len(), 2);

    fake.fail_revoke.store(false, Ordering::SeqCst);
    let mgr = start(dir.path(), &fake, 3600).await;
    // Both were live and recorded `revoking` (shutdown marked them before failing): the
    // start-up reconciliation revokes them.
    assert!(lock(&fake.creds).is_empty());
    assert!(mgr.list().await.expect("list").is_empty());
    mgr.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn orphaned_credentials_are_revoked_at_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fake = Arc::new(Fake::default());
    lock(&fake.creds).insert("b-orphan".into(), "00000000000000aa".into());
    let mgr = start(dir.path(), &fake, 3600).await;
    assert!(lock(&fake.creds).is_empty());
    assert!(mgr.list().await.expect("list").is_empty());
    mgr.shutdown().await.expect("shutdown");
}

fn profile(name: &str, when: &str, ttl_s: u64, hand_out: bool) -> Profile {
    Profile {
        name: name.into(),
        when: postern_proto::policy::Expr::parse(when).expect("expression"),
        ttl: Duration::from_secs(ttl_s),
        permissions: Vec::new(),
        hand_out,
    }
}

fn role(r: &str) -> postern_proto::policy::Attributes {
    [("role".to_owned(), r.to_owned())].into_iter().collect()
}

#[tokio::test]
async fn reloaded_profiles_revoke_only_the_leases_whose_terms_changed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fake = Arc::new(Fake::default());
    let mut cfg = config(3600);
    cfg.profiles = vec![
        profile("a", r#"role = "a""#, 3600, true),
        profile("b", r#"role = "b""#, 3600, false),
        profile("c", r#"role = "c""#, 3600, false),
    ];
    let mgr = LeaseManager::start_with(
        cfg,
        dir.path(),
        CancellationToken::new(),
        StartOptions {
            backend: Some(fake.clone()),
            crash_at: None,
        },
    )
    .await
    .expect("start");
    let name = |n: &str| NodeName::new(n).expect("name");
    let mut rx_a = mgr.subscribe_as(&name("a-1"), &role("a")).expect("a");
    let mut rx_b = mgr.subscribe_as(&name("b-1"), &role("b")).expect("b");
    let mut rx_c = mgr.subscribe_as(&name("c-1"), &role("c")).expect("c");
    let mut first = Vec::new();
    for rx in [&mut rx_a, &mut rx_b, &mut rx_c] {
        let g = tokio::time::timeout(Duration::from_secs(10), rx.wait_for(Option::is_some))
            .await
            .expect("lease in time")
            .expect("lease")
            .clone()
            .expect("some");
        first.push(g.lease_id);
    }
    let handed = mgr
        .hand_out(&name("a-2"), &role("a"), true)
        .await
        .expect("hand out");

    // `a` keeps its terms (a wider `when` only), `b` lives longer, `c` is gone.
    let done = mgr
        .set_profiles(vec![
            Arc::new(profile("a", r#"role = "a" or role = "z""#, 3600, true)),
            Arc::new(profile("b", r#"role = "b""#, 7200, false)),
        ])
        .await;
    assert_eq!(
        (done.kept, done.revoked, done.failed),
        (2, 2, 0),
        "{done:?}"
    );
    assert_eq!(done.refused, vec![name("c-1")]);
    let alive = |id: &str| lock(&fake.creds).values().any(|l| l == id);
    assert!(alive(&first[0]) && alive(&handed.grant.lease_id));
    assert!(!alive(&first[1]) && !alive(&first[2]));
    assert_eq!(
        rx_a.borrow().as_ref().map(|g| g.lease_id.clone()),
        Some(first[0].clone()),
        "an unchanged profile's lease was touched"
    );
    // `b` gets a lease of its new profile at once.
    let old_b = first[1].clone();
    let renewed = tokio::time::timeout(
        Duration::from_secs(10),
        rx_b.wait_for(|g| g.as_ref().is_some_and(|g| g.lease_id != old_b)),
    )
    .await
    .expect("new lease in time")
    .expect("lease")
    .clone()
    .expect("some");
    let info = mgr.show(&renewed.lease_id).await.expect("show");
    assert_eq!(info.profile.as_deref(), Some("b"));
    assert!(
        info.expires_at_ms - info.created_at_ms > 3_600_000,
        "{info:?}"
    );
    // `c` gets nothing more: its subscription ends, and subscribing again is refused.
    tokio::time::timeout(Duration::from_secs(10), async {
        while rx_c.changed().await.is_ok() {}
    })
    .await
    .expect("c's subscription ends");
    assert!(matches!(
        mgr.subscribe_as(&name("c-1"), &role("c")),
        Err(LeaseError::NoProfile(_))
    ));

    // `a` no longer hands out: the handed-out lease is revoked, the streamed one stays.
    let done = mgr
        .set_profiles(vec![
            Arc::new(profile("a", r#"role = "a""#, 3600, false)),
            Arc::new(profile("b", r#"role = "b""#, 7200, false)),
        ])
        .await;
    assert_eq!((done.kept, done.revoked), (2, 1), "{done:?}");
    assert!(done.refused.is_empty(), "{done:?}");
    assert!(alive(&first[0]) && !alive(&handed.grant.lease_id));
    mgr.shutdown().await.expect("shutdown");
}
