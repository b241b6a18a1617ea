//! The manager's background task: carries out the [`schedule`](super::schedule::Schedule) (make the
//! next lease, revoke an old one, withdraw one that expired) until shutdown, then revokes every
//! lease.

use super::error::LeaseError;
use super::schedule::{self, Action};
use super::shared::{lock, Inner};
use postern_net::runtime::clock::now_ms;
use postern_proto::lease::LeaseGrant;
use postern_proto::name::NodeName;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinSet;

/// How long shutdown waits for in-flight work before cutting it off.
pub const SHUTDOWN_DRAIN: Duration = Duration::from_secs(5);
/// How long shutdown spends revoking leases.
pub const SHUTDOWN_REVOKE: Duration = Duration::from_secs(15);
/// Longest the manager's task sleeps without looking at the clock again.
const MAX_IDLE: Duration = Duration::from_secs(10);

impl Inner {
    /// The background task: carries out the schedule until shutdown.
    pub(super) async fn run(self: Arc<Self>) {
        let mut tasks: JoinSet<()> = JoinSet::new();
        loop {
            let now = now_ms();
            let (actions, next, scan, reopen) = {
                let mut guard = lock(&self.state);
                let st = &mut *guard;
                for (client, tx) in &st.watchers {
                    st.schedule.set_wanted(client, tx.receiver_count() > 0);
                }
                let actions = st.schedule.poll(now);
                st.watchers
                    .retain(|c, tx| tx.receiver_count() > 0 || st.schedule.knows_client(c));
                let watchers = &st.watchers;
                st.client_profiles.retain(|c, _| watchers.contains_key(c));
                let schedule = &st.schedule;
                st.superseded.retain(|id, _| schedule.lease(id).is_some());
                let scan = match st.orphan_scan_at {
                    Some(at) if at <= now && !st.orphan_scan_running => {
                        st.orphan_scan_running = true;
                        true
                    }
                    _ => false,
                };
                let mut next = st.schedule.next_deadline();
                if let Some(at) = st.orphan_scan_at.filter(|_| !st.orphan_scan_running) {
                    next = Some(next.map_or(at, |n| n.min(at)));
                }
                let reopen = st.store_health.take_due(now);
                if let Some(at) = st.store_health.next_attempt() {
                    next = Some(next.map_or(at, |n| n.min(at)));
                }
                (actions, next, scan, reopen)
            };
            for a in actions {
                match a {
                    Action::Withdraw { client, lease_id } => {
                        if let Some(tx) = lock(&self.state).watchers.get(&client) {
                            tx.send_replace(None);
                        }
                        tracing::warn!(client = %client, lease_id = %lease_id, "lease expired with no successor");
                    }
                    Action::Create { client } => {
                        tasks.spawn(self.clone().renew(client));
                    }
                    Action::Revoke { lease_id } => {
                        tasks.spawn(self.clone().scheduled_revoke(lease_id));
                    }
                }
            }
            if scan {
                tasks.spawn(self.clone().orphan_scan());
            }
            if reopen {
                tasks.spawn(self.clone().reopen_store());
            }
            let wait = next
                .map(|t| Duration::from_millis(t.saturating_sub(now_ms())))
                .unwrap_or(MAX_IDLE)
                .min(MAX_IDLE);
            tokio::select! {
                _ = self.shutdown.cancelled() => break,
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(wait) => {}
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            }
        }
        if self.faults.crashed() {
            tasks.abort_all();
            // Like a dead process: subscribers see the channel close.
            lock(&self.state).watchers.clear();
            return;
        }
        // Graceful stop: let in-flight work finish briefly, then revoke everything.
        let drain = async { while tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(SHUTDOWN_DRAIN, drain).await.is_err() {
            tasks.abort_all();
            while tasks.join_next().await.is_some() {}
        }
        if self.store_problem().is_some() {
            // One last try, so that the leases can be revoked now rather than at the next start.
            self.clone().reopen_store().await;
        }
        let unrevoked = self.revoke_all().await;
        {
            let mut st = lock(&self.state);
            st.unrevoked_at_shutdown = unrevoked;
            // Subscribers see `None`, then the channel close.
            for tx in st.watchers.values() {
                tx.send_replace(None);
            }
            st.watchers.clear();
        }
        if !self.faults.crashed() {
            self.close_store().await;
            self.stopped.cancel();
        }
        tracing::info!(unrevoked, "lease manager stopped");
    }

    /// Revokes every lease in the store (shutdown). Returns how many could not be revoked.
    pub(super) async fn revoke_all(self: &Arc<Self>) -> usize {
        let records = match self.store_op("list", |s| s.all()).await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the lease store at shutdown; leases are revoked at the next start");
                return 0;
            }
        };
        let total = records.len();
        let mut set = JoinSet::new();
        for r in records {
            let me = self.clone();
            set.spawn(async move {
                let res = me.revoke_lease(&r.lease_id).await;
                (r, res)
            });
        }
        let mut done = 0usize;
        let collect = async {
            while let Some(joined) = set.join_next().await {
                match joined {
                    Ok((_, Ok(()))) => done += 1,
                    Ok((r, Err(e))) => tracing::error!(
                        lease_id = %r.lease_id, client = %r.client, error = %e,
                        "could not revoke a lease at shutdown; it stays recorded and is revoked at the next start"
                    ),
                    Err(_) => {}
                }
            }
        };
        if tokio::time::timeout(SHUTDOWN_REVOKE, collect)
            .await
            .is_err()
        {
            tracing::error!(
                "revoking leases at shutdown took too long; the rest are revoked at the next start"
            );
        }
        total - done
    }

    /// Carries out [`Action::Create`].
    pub(super) async fn renew(self: Arc<Self>, client: NodeName) {
        let (profile, generation) = {
            let st = lock(&self.state);
            let chosen = st.client_profiles.get(&client).map(|c| c.profile.clone());
            (chosen, st.profiles_generation)
        };
        let result = match profile.clone() {
            Some(profile) => self.create_lease(&client, profile, false).await,
            // Subscribing records the profile before the client is wanted, so this is not
            // expected; refuse rather than guess one.
            None => Err(LeaseError::NoProfile(client.clone())),
        };
        let now = now_ms();
        let revoke_stale = {
            let mut st = lock(&self.state);
            // Profiles reloaded while this lease was being made, and the client's changed: the
            // lease was made on the old terms, so it is revoked rather than handed out (the client
            // then gets one of its new profile).
            let stale = st.profiles_generation != generation
                && match (st.client_profiles.get(&client), &profile) {
                    (Some(now), Some(used)) => !now.profile.same_terms(used),
                    _ => true,
                };
            let mut revoke_stale = None;
            match result {
                Ok((rec, _)) if stale => {
                    st.schedule.created(
                        &client,
                        &rec.lease_id,
                        rec.created_at_ms,
                        rec.expires_at_ms,
                        now,
                    );
                    tracing::info!(client = %client, lease_id = %rec.lease_id, "lease made on a profile reloaded meanwhile; revoking it");
                    revoke_stale = Some(rec.lease_id);
                }
                Ok((rec, _)) if lock(&self.revoked_clients).contains(&client) => {
                    // Revoked while this lease was being made: never hand it out, revoke it now.
                    st.schedule.created(
                        &client,
                        &rec.lease_id,
                        rec.created_at_ms,
                        rec.expires_at_ms,
                        now,
                    );
                    st.schedule
                        .track(&rec.lease_id, &rec.client, rec.expires_at_ms, now);
                    tracing::info!(client = %client, lease_id = %rec.lease_id, "lease made for an identity revoked meanwhile; revoking it");
                }
                Ok((rec, credential)) => {
                    let old = st.schedule.created(
                        &client,
                        &rec.lease_id,
                        rec.created_at_ms,
                        rec.expires_at_ms,
                        now,
                    );
                    let grant = LeaseGrant {
                        lease_id: rec.lease_id.clone(),
                        credential,
                        expires_at_ms: rec.expires_at_ms,
                    };
                    st.watchers
                        .entry(client.clone())
                        .or_insert_with(|| watch::channel(None).0)
                        .send_replace(Some(grant));
                    tracing::info!(
                        client = %client, lease_id = %rec.lease_id, replaces = ?old,
                        expires_at_ms = rec.expires_at_ms, "lease issued"
                    );
                    if let Some(old) = &old {
                        st.superseded.insert(old.clone(), client.clone());
                    }
                    let action = if old.is_some() { "renew" } else { "create" };
                    if old.is_some() {
                        metrics::counter!("postern_outlet_leases_renewed_total").increment(1);
                    }
                    tracing::info!(target: "postern::audit", event = "lease", action, lease_id = %rec.lease_id, %client, replaces = ?old, expires_at_ms = rec.expires_at_ms);
                }
                Err(LeaseError::Crashed(_)) => return,
                Err(e) => {
                    // Counted by `create_lease`.
                    tracing::info!(target: "postern::audit", event = "lease", action = "create", outcome = "failed", %client);
                    let n = st.schedule.create_failed(&client, now);
                    tracing::error!(
                        client = %client, failures = n, error = %e,
                        retry_in_s = schedule::backoff(n).as_secs(),
                        "could not make a lease"
                    );
                }
            }
            revoke_stale
        };
        if let Some(id) = revoke_stale {
            if let Err(e) = self.revoke_now(&id, Some(super::PROFILE_CHANGED)).await {
                tracing::warn!(lease_id = %id, error = %e, "could not revoke a lease made on a reloaded profile now; the schedule retries");
            }
        }
        self.wake.notify_one();
    }

    /// Carries out [`Action::Revoke`].
    pub(super) async fn scheduled_revoke(self: Arc<Self>, lease_id: String) {
        let result = self.revoke_lease(&lease_id).await;
        let mut st = lock(&self.state);
        match result {
            Ok(()) => {
                st.schedule.revoked(&lease_id);
                tracing::info!(lease_id = %lease_id, "lease revoked");
            }
            Err(LeaseError::Crashed(_)) => return,
            Err(e) => {
                let client = st
                    .schedule
                    .lease(&lease_id)
                    .map(|l| l.client)
                    .unwrap_or_default();
                let n = st.schedule.revoke_failed(&lease_id, &client, now_ms());
                tracing::error!(
                    lease_id = %lease_id, client = %client, failures = n, error = %e,
                    retry_in_s = schedule::backoff(n).as_secs(),
                    "could not revoke a leased credential; it stays recorded and will be retried"
                );
            }
        }
        drop(st);
        self.wake.notify_one();
    }
}
