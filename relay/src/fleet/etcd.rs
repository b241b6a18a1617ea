//! The etcd backend: the fleet's shared state in an etcd cluster, under one key prefix.
//!
//! Keys (values are JSON):
//!
//! - `<prefix>/tickets/<id>`: [`TicketRecord`]. A use is taken in a transaction that
//!   compares the ticket's `mod_revision` with the one read, so of several relays racing for
//!   a ticket's last use exactly one wins; the others read it again and see it used.
//! - `<prefix>/identities/<name>`: [`IdentityRecord`], `revoked` included. Every relay
//!   watches them and cuts a revoked node off as soon as the event arrives.
//! - `<prefix>/drains/<name>`: [`DrainRecord`]; watched the same way, and read at start, so
//!   a drain outlives every relay's restart.
//! - `<prefix>/relays/<name>`: [`Member`], attached to the relay's lease: it vanishes by
//!   itself when the relay stops renewing it.
//!
//! Outlet presence (which relays each outlet is attached to, for home relays and redirects)
//! is meant to live at `<prefix>/presence/<outlet>/<relay>` under the same relay lease; see
//! [`Etcd::put_presence`] for the interface offered to that work.
//!
//! Every request has a deadline and asks for a leader, so a cluster without quorum answers
//! with an error (naming etcd) instead of hanging; the follower keeps the last state it saw.

use super::config::ClusterConfig;
use super::health::{Health, HealthView, Op};
use super::{DrainRecord, FleetError, FleetState, Fut, LoadFn, Member, Snapshot};
use crate::authority::{
    self, audit_enrollment, check_ticket, new_ticket, now_ms, IdentityRecord, TicketRecord,
    TicketSpec, ENROLLED_VALIDITY,
};
use crate::state::StateDir;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, PutOptions, Txn, TxnOp, TxnOpResponse,
    WatchOptions,
};
use postern_proto::msg::Refusal;
use postern_proto::name::NodeName;
use postern_proto::policy::Attributes;
use postern_proto::ticket::{EnrollRefusal, EnrollRequest, EnrollResponse, Ticket};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Deadline of one etcd request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
/// How long the follower waits before reading again after etcd failed.
const RETRY: Duration = Duration::from_millis(500);

/// An etcd error as an operator reads it (never a credential: etcd's messages hold none).
pub(crate) fn describe(e: &etcd_client::Error) -> String {
    let mut s = e.to_string();
    if s.len() > 300 {
        s.truncate(300);
        s.push('…');
    }
    s
}

/// See the module docs.
pub struct Etcd {
    client: Client,
    prefix: String,
    endpoints: Vec<String>,
    lease_ttl: Duration,
    /// The state directory holding the CA key, when this relay runs the authority.
    ca: Option<StateDir>,
    /// Whether the follower's last read or watch of etcd worked.
    connected: AtomicBool,
    /// Failures by operation and the member count, for metrics and status.
    health: Health,
}

impl Etcd {
    /// Connects to the cluster `cfg` names. `ca` is the state directory with the CA key, when
    /// this relay enrolls nodes. Credentials are read from their references here.
    pub async fn connect(cfg: &ClusterConfig, ca: Option<StateDir>) -> Result<Self, FleetError> {
        let mut opts = ConnectOptions::new()
            .with_timeout(REQUEST_TIMEOUT)
            .with_connect_timeout(REQUEST_TIMEOUT)
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
            .with_require_leader(true);
        if let (Some(user), Some(password)) = (&cfg.user, &cfg.password) {
            let user = user.resolve("cluster.user").map_err(FleetError::Config)?;
            let password = password
                .resolve("cluster.password")
                .map_err(FleetError::Config)?;
            opts = opts.with_user(user.as_str(), password.as_str());
        }
        if cfg.ca.is_some() || cfg.cert.is_some() {
            let mut tls = etcd_client::TlsOptions::new();
            if let Some(path) = &cfg.ca {
                let pem = read(path, "cluster.ca")?;
                tls = tls.ca_certificate(etcd_client::Certificate::from_pem(pem));
            }
            if let (Some(cert), Some(key)) = (&cfg.cert, &cfg.key) {
                let cert = read(cert, "cluster.cert")?;
                let key = zeroize::Zeroizing::new(read(key, "cluster.key")?);
                tls = tls.identity(etcd_client::Identity::from_pem(cert, key.as_bytes()));
            }
            opts = opts.with_tls(tls);
        }
        let client = tokio::time::timeout(
            REQUEST_TIMEOUT * 2,
            Client::connect(&cfg.endpoints, Some(opts)),
        )
        .await
        .map_err(|_| FleetError::Etcd(format!("no answer from {:?}", cfg.endpoints)))??;
        let me = Self {
            client,
            prefix: cfg.prefix.clone(),
            endpoints: cfg.endpoints.clone(),
            lease_ttl: cfg.lease_ttl,
            ca: ca.filter(|s| s.ca_key().exists()),
            connected: AtomicBool::new(true),
            health: Health::default(),
        };
        Ok(me)
    }

    fn key(&self, kind: &str, name: &str) -> String {
        format!("{}/{kind}/{name}", self.prefix)
    }

    fn dir(&self, kind: &str) -> String {
        format!("{}/{kind}/", self.prefix)
    }

    /// Every record under `<prefix>/<kind>/`, with its name.
    async fn list<T: serde::de::DeserializeOwned>(
        &self,
        kind: &str,
    ) -> Result<Vec<(String, T)>, FleetError> {
        let dir = self.dir(kind);
        let resp = self
            .client
            .kv_client()
            .get(dir.clone(), Some(GetOptions::new().with_prefix()))
            .await?;
        Ok(parse_all(&dir, resp.kvs()))
    }

    /// The revocations and drains, read at one revision; and that revision.
    async fn read_snapshot(&self) -> Result<(Snapshot, i64), FleetError> {
        let (ids, drains) = (self.dir("identities"), self.dir("drains"));
        let txn = Txn::new().and_then([
            TxnOp::get(ids.clone(), Some(GetOptions::new().with_prefix())),
            TxnOp::get(drains.clone(), Some(GetOptions::new().with_prefix())),
        ]);
        let resp = self.client.kv_client().txn(txn).await?;
        let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
        let mut snap = Snapshot::default();
        for op in resp.op_responses() {
            let TxnOpResponse::Get(get) = op else {
                continue;
            };
            for (name, rec) in parse_all::<IdentityRecord>(&ids, get.kvs()) {
                if rec.revoked {
                    if let Ok(n) = name.parse() {
                        snap.revoked.insert(n);
                    }
                }
            }
            for (name, rec) in parse_all::<DrainRecord>(&drains, get.kvs()) {
                if let Ok(n) = name.parse() {
                    snap.drained.insert(n, rec);
                }
            }
        }
        Ok((snap, revision))
    }

    async fn try_enroll(&self, req: &EnrollRequest) -> Result<EnrollResponse, EnrollRefusal> {
        let state = self.ca.clone().ok_or(EnrollRefusal::NotAuthority)?;
        if !authority::valid_ticket_id(&req.ticket_id) {
            return Err(EnrollRefusal::UnknownTicket);
        }
        let unavailable = |what: &str, e: &dyn std::fmt::Display| {
            tracing::error!(error = %e, "cannot {what} for enrollment");
            EnrollRefusal::Unavailable
        };
        let etcd = |e: etcd_client::Error| {
            let e = FleetError::from(e);
            self.health.fail(Op::Enroll, &e);
            unavailable("reach etcd", &e)
        };
        let tkey = self.key("tickets", &req.ticket_id);
        let mut kv = self.client.kv_client();
        // A lost race means someone else took a use: read again (and usually find it spent).
        for _ in 0..8 {
            let got = kv.get(tkey.clone(), None).await.map_err(etcd)?;
            let Some(t) = got.kvs().first() else {
                return Err(EnrollRefusal::UnknownTicket);
            };
            let ticket_rev = t.mod_revision();
            let mut record: TicketRecord = serde_json::from_slice(t.value())
                .map_err(|e| unavailable("read the ticket's record in etcd", &e))?;
            let now = now_ms();
            let name = check_ticket(&record, req, now)?;
            let ikey = self.key("identities", name.as_str());
            let got = kv.get(ikey.clone(), None).await.map_err(etcd)?;
            let identity_rev = got.kvs().first().map(|kv| kv.mod_revision()).unwrap_or(0);
            let revoked = got
                .kvs()
                .first()
                .and_then(|kv| serde_json::from_slice::<IdentityRecord>(kv.value()).ok())
                .is_some_and(|i| i.revoked);
            if revoked {
                return Err(EnrollRefusal::Revoked { name });
            }
            let (csr, signed_name, attrs) =
                (req.csr_pem.clone(), name.clone(), record.attrs.clone());
            let st = state.clone();
            let signed = tokio::task::spawn_blocking(move || {
                let ca = st.load_ca().map_err(|e| {
                    tracing::error!(error = %e, "cannot load the CA for enrollment");
                    EnrollRefusal::Unavailable
                })?;
                let cert = ca
                    .sign_csr(&csr, &signed_name, &attrs, ENROLLED_VALIDITY)
                    .map_err(|e| EnrollRefusal::BadRequest {
                        detail: e.to_string(),
                    })?;
                Ok::<_, EnrollRefusal>((cert, ca.cert_pem().to_owned()))
            })
            .await
            .map_err(|_| EnrollRefusal::Unavailable)??;
            record.uses_left -= 1;
            record.used_by.push(name.clone());
            let identity = IdentityRecord {
                name: name.clone(),
                attrs: record.attrs.clone(),
                enrolled_at_ms: now,
                ticket_id: record.id.clone(),
                revoked: false,
            };
            let txn = Txn::new()
                .when([
                    Compare::mod_revision(tkey.clone(), CompareOp::Equal, ticket_rev),
                    Compare::mod_revision(ikey.clone(), CompareOp::Equal, identity_rev),
                ])
                .and_then([
                    TxnOp::put(
                        tkey.clone(),
                        to_json(&record).map_err(|e| unavailable("encode the ticket", &e))?,
                        None,
                    ),
                    TxnOp::put(
                        ikey,
                        to_json(&identity).map_err(|e| unavailable("encode the identity", &e))?,
                        None,
                    ),
                ]);
            if kv.txn(txn).await.map_err(etcd)?.succeeded() {
                tracing::info!(node = %name, attrs = ?record.attrs, ticket = %record.id, "node enrolled");
                return Ok(EnrollResponse::Enrolled {
                    name,
                    attrs: record.attrs,
                    cert_pem: signed.0,
                    ca_pem: signed.1,
                });
            }
        }
        tracing::warn!(ticket = %req.ticket_id, "the ticket kept losing enrollment races; refusing this one for now");
        Err(EnrollRefusal::Unavailable)
    }

    /// For outlet presence (not used yet): records that `outlet` is attached to this relay,
    /// under the relay's membership lease `lease`, so the entry goes when the relay dies. The
    /// home-relay work reads `<prefix>/presence/<outlet>/` to find where to redirect an inlet.
    pub async fn put_presence(
        &self,
        lease: i64,
        outlet: &NodeName,
        relay: &str,
    ) -> Result<(), FleetError> {
        let key = format!("{}/presence/{outlet}/{relay}", self.prefix);
        self.client
            .kv_client()
            .put(
                key,
                b"{}".to_vec(),
                Some(PutOptions::new().with_lease(lease)),
            )
            .await?;
        Ok(())
    }

    /// One membership lease: granted, the member put under it, kept alive (with the load
    /// refreshed) until etcd fails (`Err`) or shutdown (`Ok`, the lease revoked).
    async fn one_lease(
        &self,
        me: &mut Member,
        load: &LoadFn,
        shutdown: &CancellationToken,
    ) -> Result<(), FleetError> {
        let ttl = self.lease_ttl.as_secs().max(1) as i64;
        let mut lease = self.client.lease_client();
        let id = lease.grant(ttl, None).await?.id();
        let key = self.key("relays", &me.name);
        let mut kv = self.client.kv_client();
        let (mut keeper, mut acks) = lease.keep_alive(id).await?;
        let tick = (self.lease_ttl / 3).max(Duration::from_millis(300));
        tracing::info!(relay = %me.name, lease_ttl = ?self.lease_ttl, "joined the fleet in etcd");
        loop {
            me.load = load();
            me.updated_at_ms = now_ms();
            let value =
                serde_json::to_vec(&*me).map_err(|e| FleetError::Internal(e.to_string()))?;
            kv.put(key.clone(), value, Some(PutOptions::new().with_lease(id)))
                .await?;
            let count = kv
                .get(
                    self.dir("relays"),
                    Some(GetOptions::new().with_prefix().with_count_only()),
                )
                .await?;
            self.health.set_members(count.count().max(0) as u64);
            tokio::select! {
                _ = shutdown.cancelled() => {
                    let _ = tokio::time::timeout(REQUEST_TIMEOUT, lease.revoke(id)).await;
                    tracing::info!(relay = %me.name, "left the fleet");
                    return Ok(());
                }
                _ = tokio::time::sleep(tick) => {}
            }
            keeper.keep_alive().await?;
            match tokio::time::timeout(REQUEST_TIMEOUT, acks.message()).await {
                Ok(Ok(Some(ack))) if ack.ttl() > 0 => {}
                Ok(Ok(Some(_))) => {
                    return Err(FleetError::Etcd("the membership lease expired".into()))
                }
                Ok(Ok(None)) => {
                    return Err(FleetError::Etcd("lease keep-alive stream ended".into()))
                }
                Ok(Err(e)) => return Err(e.into()),
                Err(_) => return Err(FleetError::Etcd("no answer to a lease keep-alive".into())),
            }
        }
    }
}

fn read(path: &std::path::Path, key: &str) -> Result<String, FleetError> {
    std::fs::read_to_string(path)
        .map_err(|e| FleetError::Config(format!("{key}: cannot read {}: {e}", path.display())))
}

/// Records under `dir` that parse, by the rest of their key; damaged ones are skipped with a
/// warning (one bad value must not hide the others).
fn parse_all<T: serde::de::DeserializeOwned>(
    dir: &str,
    kvs: &[etcd_client::KeyValue],
) -> Vec<(String, T)> {
    kvs.iter()
        .filter_map(|kv| {
            let key = kv.key_str().ok()?;
            let name = key.strip_prefix(dir)?;
            match serde_json::from_slice(kv.value()) {
                Ok(v) => Some((name.to_owned(), v)),
                Err(e) => {
                    tracing::warn!(key, error = %e, "skipping a damaged record in etcd");
                    None
                }
            }
        })
        .collect()
}

/// A record as the JSON value it is stored as.
fn to_json<T: serde::Serialize>(v: &T) -> Result<Vec<u8>, String> {
    serde_json::to_vec(v).map_err(|e| e.to_string())
}

impl FleetState for Etcd {
    fn describe(&self) -> String {
        format!("etcd {:?} under {}", self.endpoints, self.prefix)
    }

    fn connected(&self) -> Option<bool> {
        Some(self.connected.load(Relaxed))
    }

    fn runs_authority(&self) -> bool {
        self.ca.is_some()
    }

    fn keeps_identities(&self) -> bool {
        true
    }

    fn create_ticket(&self, spec: TicketSpec) -> Fut<'_, Result<Ticket, FleetError>> {
        Box::pin(async move {
            let r = async {
                let state = self.ca.clone().ok_or(FleetError::NoAuthority)?;
                let ca = tokio::task::spawn_blocking(move || state.load_ca())
                    .await
                    .map_err(|e| FleetError::Internal(e.to_string()))??;
                let (ticket, record) = new_ticket(&ca, spec);
                let key = self.key("tickets", &record.id);
                let value =
                    serde_json::to_vec(&record).map_err(|e| FleetError::Internal(e.to_string()))?;
                // Ids are random; the comparison only guards against a collision overwriting one.
                let txn = Txn::new()
                    .when([Compare::version(key.clone(), CompareOp::Equal, 0)])
                    .and_then([TxnOp::put(key, value, None)]);
                if !self.client.kv_client().txn(txn).await?.succeeded() {
                    return Err(FleetError::Internal(
                        "ticket id collision; try again".into(),
                    ));
                }
                Ok(ticket)
            }
            .await;
            self.health.tally(Op::Ticket, r)
        })
    }

    fn enroll(&self, req: EnrollRequest) -> Fut<'_, EnrollResponse> {
        Box::pin(async move {
            let result = self.try_enroll(&req).await;
            audit_enrollment(&req, result)
        })
    }

    fn renew(
        &self,
        name: NodeName,
        attrs: Attributes,
        csr_pem: String,
    ) -> Fut<'_, Result<String, Refusal>> {
        Box::pin(async move {
            let state = self.ca.clone().ok_or(Refusal::NoAuthority)?;
            let got = self
                .client
                .kv_client()
                .get(self.key("identities", name.as_str()), None)
                .await
                .map_err(|e| {
                    let e = FleetError::from(e);
                    self.health.fail(Op::Renew, &e);
                    tracing::error!(error = %e, "cannot read the identity from etcd for renewal");
                    Refusal::Internal
                })?;
            let revoked = got
                .kvs()
                .first()
                .and_then(|kv| serde_json::from_slice::<IdentityRecord>(kv.value()).ok())
                .is_some_and(|i| i.revoked);
            if revoked {
                return Err(Refusal::RenewalRefused {
                    why: format!("identity {name} has been revoked"),
                });
            }
            tokio::task::spawn_blocking(move || {
                let ca = state.load_ca().map_err(|e| {
                    tracing::error!(error = %e, "cannot load the CA for renewal");
                    Refusal::Internal
                })?;
                let cert = ca
                    .sign_csr(&csr_pem, &name, &attrs, ENROLLED_VALIDITY)
                    .map_err(|e| Refusal::RenewalRefused {
                        why: format!("certificate request refused: {e}"),
                    })?;
                tracing::info!(target: "postern::audit", event = "renewal", node = %name, "certificate renewed");
                Ok(cert)
            })
            .await
            .map_err(|_| Refusal::Internal)?
        })
    }

    fn tickets(&self) -> Fut<'_, Result<Vec<TicketRecord>, FleetError>> {
        Box::pin(async move {
            let r = async {
                Ok(self
                    .list::<TicketRecord>("tickets")
                    .await?
                    .into_iter()
                    .map(|(_, t)| t)
                    .collect())
            }
            .await;
            self.health.tally(Op::Read, r)
        })
    }

    fn identities(&self) -> Fut<'_, Result<Vec<IdentityRecord>, FleetError>> {
        Box::pin(async move {
            let r = async {
                Ok(self
                    .list::<IdentityRecord>("identities")
                    .await?
                    .into_iter()
                    .map(|(_, i)| i)
                    .collect())
            }
            .await;
            self.health.tally(Op::Read, r)
        })
    }

    fn revoke(&self, name: NodeName) -> Fut<'_, Result<bool, FleetError>> {
        Box::pin(async move {
            let r = async {
                let key = self.key("identities", name.as_str());
                let mut kv = self.client.kv_client();
                for _ in 0..8 {
                    let got = kv.get(key.clone(), None).await?;
                    let (rev, record) = match got.kvs().first() {
                        Some(kv) => (
                            kv.mod_revision(),
                            serde_json::from_slice::<IdentityRecord>(kv.value()).ok(),
                        ),
                        None => (0, None),
                    };
                    let existed = record.is_some();
                    let mut record = record.unwrap_or_else(|| IdentityRecord {
                        name: name.clone(),
                        attrs: Attributes::new(),
                        enrolled_at_ms: 0,
                        ticket_id: String::new(),
                        revoked: true,
                    });
                    record.revoked = true;
                    let value = serde_json::to_vec(&record)
                        .map_err(|e| FleetError::Internal(e.to_string()))?;
                    let txn = Txn::new()
                        .when([Compare::mod_revision(key.clone(), CompareOp::Equal, rev)])
                        .and_then([TxnOp::put(key.clone(), value, None)]);
                    if kv.txn(txn).await?.succeeded() {
                        return Ok(existed);
                    }
                }
                Err(FleetError::Etcd(
                    "the identity kept changing while it was being revoked".into(),
                ))
            }
            .await;
            self.health.tally(Op::Revoke, r)
        })
    }

    fn set_drain(
        &self,
        name: NodeName,
        drain: Option<DrainRecord>,
    ) -> Fut<'_, Result<(), FleetError>> {
        Box::pin(async move {
            let r = async {
                let key = self.key("drains", name.as_str());
                let mut kv = self.client.kv_client();
                match drain {
                    Some(d) => {
                        let value = serde_json::to_vec(&d)
                            .map_err(|e| FleetError::Internal(e.to_string()))?;
                        kv.put(key, value, None).await?;
                    }
                    None => {
                        kv.delete(key, None).await?;
                    }
                }
                Ok(())
            }
            .await;
            self.health.tally(Op::Drain, r)
        })
    }

    fn snapshot(&self) -> Fut<'_, Result<Snapshot, FleetError>> {
        Box::pin(async move {
            let r = async { Ok(self.read_snapshot().await?.0) }.await;
            self.health.tally(Op::Read, r)
        })
    }

    fn follow(
        self: Arc<Self>,
        tx: watch::Sender<Snapshot>,
        shutdown: CancellationToken,
    ) -> Fut<'static, ()> {
        Box::pin(async move {
            let watched = [self.dir("identities"), self.dir("drains")];
            let mut failing = false;
            loop {
                // Read everything, then watch from the revision after it; any change to a
                // revocation or drain reads everything again (they are few).
                let step = async {
                    let (snap, rev) = self.read_snapshot().await?;
                    if failing {
                        tracing::info!("etcd answers again: following the fleet's state");
                    }
                    self.connected.store(true, Relaxed);
                    tx.send_if_modified(|s| {
                        let changed = *s != snap;
                        *s = snap;
                        changed
                    });
                    let mut w = self.client.watch_client();
                    let mut stream = w
                        .watch(
                            format!("{}/", self.prefix),
                            Some(
                                WatchOptions::new()
                                    .with_prefix()
                                    .with_start_revision(rev + 1),
                            ),
                        )
                        .await?;
                    loop {
                        let Some(resp) = stream.message().await? else {
                            return Err(FleetError::Etcd("the watch ended".into()));
                        };
                        if resp.canceled() {
                            return Err(FleetError::Etcd(format!(
                                "the watch was cancelled: {}",
                                resp.cancel_reason()
                            )));
                        }
                        let relevant = resp.events().iter().any(|e| {
                            e.kv()
                                .and_then(|kv| kv.key_str().ok())
                                .is_some_and(|k| watched.iter().any(|d| k.starts_with(d.as_str())))
                        });
                        if relevant {
                            return Ok::<(), FleetError>(());
                        }
                    }
                };
                let result = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    r = step => r,
                };
                if let Err(e) = result {
                    self.connected.store(false, Relaxed);
                    self.health.fail(Op::Follow, &e);
                    if !failing {
                        tracing::warn!(error = %e, "lost the fleet's state in etcd: serving from the last state seen");
                    }
                    failing = true;
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(RETRY) => {}
                    }
                } else {
                    failing = false;
                }
            }
        })
    }

    fn serve_membership(
        self: Arc<Self>,
        mut me: Member,
        load: LoadFn,
        shutdown: CancellationToken,
    ) -> Fut<'static, ()> {
        Box::pin(async move {
            loop {
                match self.one_lease(&mut me, &load, &shutdown).await {
                    Ok(()) => return,
                    Err(e) => {
                        self.health.fail(Op::Membership, &e);
                        tracing::warn!(error = %e, relay = %me.name, "fleet membership lost; joining again");
                    }
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        })
    }

    fn members(&self) -> Fut<'_, Result<Vec<Member>, FleetError>> {
        Box::pin(async move {
            let r: Result<Vec<Member>, FleetError> = async {
                Ok(self
                    .list::<Member>("relays")
                    .await?
                    .into_iter()
                    .map(|(_, m)| m)
                    .collect())
            }
            .await;
            if let Ok(members) = &r {
                self.health.set_members(members.len() as u64);
            }
            self.health.tally(Op::Read, r)
        })
    }

    fn health(&self) -> Option<HealthView> {
        Some(self.health.view())
    }
}
