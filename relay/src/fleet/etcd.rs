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
//! - `<prefix>/presence/<service>/<outlet>/<relay>`: [`PresenceValue`] (the holding relay's
//!   addresses), attached to the holding relay's lease: outlet `<outlet>` has registered
//!   `<service>` on relay `<relay>`. Keyed by service first, so a relay finds the holders of
//!   a service under one prefix. Every relay follows `relays/` and `presence/` with a watch
//!   ([`FleetState::follow_fleet`]) and redirects inlets from that copy, never from a read
//!   per request.
//!
//! Every request has a deadline and asks for a leader, so a cluster without quorum answers
//! with an error (naming etcd) instead of hanging; the follower keeps the last state it saw.

use super::config::ClusterConfig;
use super::health::{Health, HealthView, Op};
use super::{
    DrainRecord, FleetError, FleetState, FleetView, Fut, LoadFn, Member, Presence, Snapshot,
};
use crate::authority::{
    self, audit_enrollment, check_ticket, new_ticket, now_ms, IdentityRecord, TicketRecord,
    TicketSpec, ENROLLED_VALIDITY,
};
use crate::state::StateDir;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions, Txn, TxnOp,
    TxnOpResponse, WatchOptions,
};
use postern_proto::msg::Refusal;
use postern_proto::name::{NodeName, ServiceName};
use postern_proto::policy::Attributes;
use postern_proto::ticket::{EnrollRefusal, EnrollRequest, EnrollResponse, Ticket};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
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
    /// While it lives, the endpoint watcher keeps the client off members that are down.
    _alive: Arc<()>,
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
    /// The membership lease in force (none before joining, or after losing it).
    lease: Mutex<Option<i64>>,
    /// How this relay registers (set when membership starts): presence entries carry it.
    me: Mutex<Option<Member>>,
    /// The presence this relay holds, as last asked for: written again under each new lease.
    held: Mutex<BTreeMap<NodeName, Vec<ServiceName>>>,
    /// Orders presence writes with their re-writing under a new lease.
    presence_writes: tokio::sync::Mutex<()>,
}

/// The value of a presence key: where nodes reach the holding relay.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PresenceValue {
    pub addresses: Vec<String>,
}

/// Most operations in one etcd transaction (etcd's default limit is 128).
const TXN_OPS: usize = 100;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Etcd {
    /// Refuses to sign for `name` when its identity record says it was revoked (renewals and
    /// public hostname certificates alike).
    async fn refuse_revoked(&self, name: &NodeName) -> Result<(), Refusal> {
        let got = self
            .client
            .kv_client()
            .get(self.key("identities", name.as_str()), None)
            .await
            .map_err(|e| {
                let e = FleetError::from(e);
                self.health.fail(Op::Renew, &e);
                tracing::error!(error = %e, "cannot read the identity from etcd for signing");
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
        Ok(())
    }

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
        let alive = Arc::new(());
        super::endpoints::watch(
            client.clone(),
            cfg.endpoints.clone(),
            Arc::downgrade(&alive),
        )
        .await;
        let me = Self {
            _alive: alive,
            client,
            prefix: cfg.prefix.clone(),
            endpoints: cfg.endpoints.clone(),
            lease_ttl: cfg.lease_ttl,
            ca: ca.filter(|s| s.ca_key().exists()),
            connected: AtomicBool::new(true),
            health: Health::default(),
            lease: Mutex::new(None),
            me: Mutex::new(None),
            held: Mutex::default(),
            presence_writes: tokio::sync::Mutex::const_new(()),
        };
        Ok(me)
    }

    fn key(&self, kind: &str, name: &str) -> String {
        format!("{}/{kind}/{name}", self.prefix)
    }

    fn dir(&self, kind: &str) -> String {
        format!("{}/{kind}/", self.prefix)
    }

    /// Watches `<prefix>/<first>/` and `<prefix>/<last>/`, two directories next to each other
    /// in key order, from revision `rev`: one range holds both and no other of the fleet's
    /// keys, so a follower is not woken by the writes it does not follow (the presence
    /// records change far more often than revocations and drains).
    async fn watch_dirs(
        &self,
        first: &str,
        last: &str,
        rev: i64,
    ) -> Result<etcd_client::WatchStream, FleetError> {
        // The end of the range is exclusive: `0` is the byte after `/`.
        let end = format!("{}/{last}0", self.prefix);
        let opts = WatchOptions::new().with_range(end).with_start_revision(rev);
        Ok(self
            .client
            .watch_client()
            .watch(self.dir(first), Some(opts))
            .await?)
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

    fn presence_key(&self, service: &ServiceName, outlet: &NodeName, relay: &str) -> String {
        format!("{}/presence/{service}/{outlet}/{relay}", self.prefix)
    }

    /// Runs `ops` in transactions of at most [`TXN_OPS`].
    async fn apply(&self, mut ops: Vec<TxnOp>) -> Result<(), FleetError> {
        let mut kv = self.client.kv_client();
        while !ops.is_empty() {
            let rest = ops.split_off(ops.len().min(TXN_OPS));
            kv.txn(Txn::new().and_then(ops)).await?;
            ops = rest;
        }
        Ok(())
    }

    /// Writes every presence entry this relay holds under `lease` (a new membership lease:
    /// the old one's entries are gone or going), and makes `lease` the one later writes use.
    async fn republish(&self, lease: i64, me: &Member) -> Result<(), FleetError> {
        let _w = self.presence_writes.lock().await;
        let value = serde_json::to_vec(&PresenceValue {
            addresses: me.addresses.clone(),
        })
        .map_err(|e| FleetError::Internal(e.to_string()))?;
        let held = lock(&self.held).clone();
        let mut ops = Vec::new();
        for (outlet, services) in &held {
            for s in services {
                ops.push(TxnOp::put(
                    self.presence_key(s, outlet, &me.name),
                    value.clone(),
                    Some(PutOptions::new().with_lease(lease)),
                ));
            }
        }
        self.apply(ops).await?;
        *lock(&self.lease) = Some(lease);
        Ok(())
    }

    /// The members and presence in `raw` (keys under `relays/` and `presence/`, with their
    /// values), as a [`FleetView`]. Damaged entries are skipped.
    fn view_of(&self, raw: &BTreeMap<String, Vec<u8>>) -> FleetView {
        let (relays, presence) = (self.dir("relays"), self.dir("presence"));
        let mut view = FleetView::default();
        let mut held: BTreeMap<(NodeName, String), (Vec<String>, BTreeSet<ServiceName>)> =
            BTreeMap::new();
        for (key, value) in raw {
            if key.starts_with(&relays) {
                match serde_json::from_slice::<Member>(value) {
                    Ok(m) => view.members.push(m),
                    Err(e) => tracing::warn!(key, error = %e, "skipping a damaged member in etcd"),
                }
            } else if let Some(rest) = key.strip_prefix(&presence) {
                let Some((service, outlet, relay)) = split_presence(rest) else {
                    continue;
                };
                let Ok(v) = serde_json::from_slice::<PresenceValue>(value) else {
                    tracing::warn!(key, "skipping a damaged presence entry in etcd");
                    continue;
                };
                let e = held.entry((outlet, relay)).or_default();
                e.0 = v.addresses;
                e.1.insert(service);
            }
        }
        view.members.sort_by(|a, b| a.name.cmp(&b.name));
        view.presence = held
            .into_iter()
            .map(|((outlet, relay), (addresses, services))| Presence {
                outlet,
                relay,
                addresses,
                services: services.into_iter().collect(),
            })
            .collect();
        view
    }

    /// Every key and value under `relays/` and `presence/`, read at one revision; and that
    /// revision.
    async fn read_fleet(&self) -> Result<(BTreeMap<String, Vec<u8>>, i64), FleetError> {
        let txn = Txn::new().and_then([
            TxnOp::get(self.dir("relays"), Some(GetOptions::new().with_prefix())),
            TxnOp::get(self.dir("presence"), Some(GetOptions::new().with_prefix())),
        ]);
        let resp = self.client.kv_client().txn(txn).await?;
        let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
        let mut raw = BTreeMap::new();
        for op in resp.op_responses() {
            let TxnOpResponse::Get(get) = op else {
                continue;
            };
            for kv in get.kvs() {
                if let Ok(k) = kv.key_str() {
                    raw.insert(k.to_owned(), kv.value().to_vec());
                }
            }
        }
        Ok((raw, revision))
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
        self.republish(id, me).await?;
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
            self.refuse_revoked(&name).await?;
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

    fn issue_hostname(
        &self,
        name: NodeName,
        hostname: String,
        csr_pem: String,
        valid_for: Duration,
    ) -> Fut<'_, Result<String, Refusal>> {
        Box::pin(async move {
            let state = self.ca.clone().ok_or(Refusal::NoAuthority)?;
            self.refuse_revoked(&name).await?;
            tokio::task::spawn_blocking(move || {
                crate::authority::sign_hostname(&state, &name, &hostname, &csr_pem, valid_for)
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
                    let mut watch = self.watch_dirs("drains", "identities", rev + 1).await?;
                    loop {
                        let resp = next_message(&mut watch).await?;
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
            *lock(&self.me) = Some(me.clone());
            loop {
                let result = self.one_lease(&mut me, &load, &shutdown).await;
                *lock(&self.lease) = None;
                match result {
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

    fn set_presence(
        &self,
        outlet: NodeName,
        services: Vec<ServiceName>,
    ) -> Fut<'_, Result<(), FleetError>> {
        Box::pin(async move {
            let _w = self.presence_writes.lock().await;
            let old = {
                let mut held = lock(&self.held);
                let old = held.get(&outlet).cloned().unwrap_or_default();
                if services.is_empty() {
                    held.remove(&outlet);
                } else {
                    held.insert(outlet.clone(), services.clone());
                }
                old
            };
            let lease = *lock(&self.lease);
            let me = lock(&self.me).clone();
            // Not in the fleet yet: written when the lease is granted.
            let (Some(lease), Some(me)) = (lease, me) else {
                return Ok(());
            };
            let value = serde_json::to_vec(&PresenceValue {
                addresses: me.addresses.clone(),
            })
            .map_err(|e| FleetError::Internal(e.to_string()))?;
            let mut ops: Vec<TxnOp> = old
                .iter()
                .filter(|s| !services.contains(s))
                .map(|s| TxnOp::delete(self.presence_key(s, &outlet, &me.name), None))
                .collect();
            ops.extend(services.iter().map(|s| {
                TxnOp::put(
                    self.presence_key(s, &outlet, &me.name),
                    value.clone(),
                    Some(PutOptions::new().with_lease(lease)),
                )
            }));
            self.apply(ops).await
        })
    }

    fn presence(&self) -> Fut<'_, Result<Vec<Presence>, FleetError>> {
        Box::pin(async move {
            let (raw, _) = self.read_fleet().await?;
            Ok(self.view_of(&raw).presence)
        })
    }

    fn follow_fleet(
        self: Arc<Self>,
        tx: watch::Sender<FleetView>,
        shutdown: CancellationToken,
    ) -> Fut<'static, ()> {
        Box::pin(async move {
            let watched = [self.dir("relays"), self.dir("presence")];
            let publish = |raw: &BTreeMap<String, Vec<u8>>| {
                let view = self.view_of(raw);
                tx.send_if_modified(|v| {
                    let changed = *v != view;
                    *v = view;
                    changed
                });
            };
            loop {
                // Read everything once, then apply the watch's events to that copy.
                let step = async {
                    let (mut raw, rev) = self.read_fleet().await?;
                    publish(&raw);
                    let mut watch = self.watch_dirs("presence", "relays", rev + 1).await?;
                    loop {
                        let resp = next_message(&mut watch).await?;
                        let mut changed = false;
                        for e in resp.events() {
                            let Some(kv) = e.kv() else { continue };
                            let Ok(key) = kv.key_str() else { continue };
                            if !watched.iter().any(|d| key.starts_with(d.as_str())) {
                                continue;
                            }
                            changed = true;
                            match e.event_type() {
                                EventType::Put => {
                                    raw.insert(key.to_owned(), kv.value().to_vec());
                                }
                                EventType::Delete => {
                                    raw.remove(key);
                                }
                            }
                        }
                        if changed {
                            publish(&raw);
                        }
                    }
                };
                let result: Result<(), FleetError> = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    r = step => r,
                };
                if let Err(e) = result {
                    tracing::debug!(error = %e, "fleet watch failed; keeping the last view");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(RETRY) => {}
                    }
                }
            }
        })
    }
}

/// The next answer on a watch from [`Etcd::watch_dirs`]; its end or cancellation is an error
/// (the follower reads everything again and watches anew).
async fn next_message(
    stream: &mut etcd_client::WatchStream,
) -> Result<etcd_client::WatchResponse, FleetError> {
    let Some(resp) = stream.message().await? else {
        return Err(FleetError::Etcd("the watch ended".into()));
    };
    if resp.canceled() {
        return Err(FleetError::Etcd(format!(
            "the watch was cancelled: {}",
            resp.cancel_reason()
        )));
    }
    Ok(resp)
}

/// `<service>/<outlet>/<relay>` (a presence key after its directory), parsed.
fn split_presence(rest: &str) -> Option<(ServiceName, NodeName, String)> {
    let mut parts = rest.splitn(3, '/');
    let service = parts.next()?.parse().ok()?;
    let outlet = parts.next()?.parse().ok()?;
    let relay = parts.next().filter(|r| !r.is_empty())?.to_owned();
    Some((service, outlet, relay))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presence_keys_split_into_service_outlet_and_relay() {
        let (s, o, r) = split_presence("echo/outlet-1/relay-a").expect("parse");
        assert_eq!(
            (s.as_str(), o.as_str(), r.as_str()),
            ("echo", "outlet-1", "relay-a")
        );
        assert!(split_presence("echo/outlet-1").is_none());
        assert!(split_presence("echo/outlet-1/").is_none());
        assert!(split_presence("bad name/outlet-1/relay-a").is_none());
    }
}
