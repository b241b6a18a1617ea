//! When to make, renew and revoke leases: a deterministic state machine with no clock of its
//! own and no I/O (time is passed in as milliseconds since the Unix epoch), driven by the
//! lease manager and tested here with a virtual clock.
//!
//! Rules:
//! - a client that is *wanted* (someone is subscribed to its lease) and has no current lease
//!   gets one; when the current lease reaches two thirds of its life, a new one is made;
//! - when the new one is issued, the old one stays valid for a grace period
//!   (`min(ttl / 3, 30 s)`, and never past its own expiry) so requests already in flight with it
//!   finish, then it is revoked;
//! - a client nobody is subscribed to is not renewed: its lease is left to expire, and is
//!   revoked at expiry;
//! - every lease is revoked at its expiry at the latest; a failed revocation is retried with
//!   exponential backoff (1 s doubling to 60 s) and never dropped; a failed creation likewise.

use postern_proto::name::NodeName;
use std::collections::BTreeMap;
use std::time::Duration;

/// Longest grace period for a superseded lease.
pub const MAX_GRACE: Duration = Duration::from_secs(30);
/// First retry delay after a failure.
pub const BACKOFF_MIN: Duration = Duration::from_secs(1);
/// Longest retry delay.
pub const BACKOFF_MAX: Duration = Duration::from_secs(60);

/// Timing policy derived from the configured TTL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Lifetime of a lease, ms.
    pub ttl_ms: u64,
    /// How long a superseded lease stays valid, ms.
    pub grace_ms: u64,
}

impl Policy {
    /// The policy for leases that live `ttl`: grace is `min(ttl / 3, 30 s)`.
    pub fn new(ttl: Duration) -> Self {
        let ttl_ms = ttl.as_millis().min(u128::from(u64::MAX)) as u64;
        Policy {
            ttl_ms,
            grace_ms: (ttl_ms / 3).min(MAX_GRACE.as_millis() as u64),
        }
    }

    /// When a lease made at `created` and ending at `expires` should be renewed: at two thirds
    /// of its life.
    pub fn renew_at(created_ms: u64, expires_ms: u64) -> u64 {
        created_ms + expires_ms.saturating_sub(created_ms) * 2 / 3
    }
}

/// Retry delay after `failures` consecutive failures (1 s, 2 s, 4 s, … capped at 60 s).
pub fn backoff(failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(16);
    BACKOFF_MIN.saturating_mul(1u32 << exp).min(BACKOFF_MAX)
}

/// Something the driver must do now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Make a new lease for this client (its first, or the renewal of the current one); report
    /// with [`Schedule::created`] or [`Schedule::create_failed`].
    Create { client: NodeName },
    /// Revoke this lease; report with [`Schedule::revoked`] or [`Schedule::revoke_failed`].
    Revoke { lease_id: String },
    /// The client's current lease has expired with no successor: tell its subscribers that
    /// there is no valid lease.
    Withdraw { client: NodeName, lease_id: String },
}

#[derive(Debug, Clone)]
struct LeaseTrack {
    client: String,
    expires_at_ms: u64,
    /// When a current lease is due for renewal.
    renew_at_ms: u64,
    revoke_at_ms: u64,
    in_flight: bool,
    failures: u32,
}

#[derive(Debug, Clone, Default)]
struct ClientTrack {
    current: Option<String>,
    wanted: bool,
    creating: bool,
    failures: u32,
    retry_at_ms: u64,
}

/// What [`Schedule::lease`] reports about one tracked lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrackedLease {
    pub client: String,
    pub expires_at_ms: u64,
    /// When it is (or was) due for revocation.
    pub revoke_at_ms: u64,
    /// Consecutive failed revocations.
    pub failures: u32,
    /// It is the lease currently streamed to its client.
    pub current: bool,
}

/// The schedule of every lease this outlet holds.
#[derive(Debug, Clone)]
pub struct Schedule {
    policy: Policy,
    leases: BTreeMap<String, LeaseTrack>,
    clients: BTreeMap<NodeName, ClientTrack>,
}

impl Schedule {
    /// An empty schedule.
    pub fn new(policy: Policy) -> Self {
        Schedule {
            policy,
            leases: BTreeMap::new(),
            clients: BTreeMap::new(),
        }
    }

    /// The policy in force.
    pub fn policy(&self) -> Policy {
        self.policy
    }

    /// Says whether anyone is subscribed to `client`'s lease.
    pub fn set_wanted(&mut self, client: &NodeName, wanted: bool) {
        match self.clients.get_mut(client) {
            Some(c) => c.wanted = wanted,
            None if wanted => {
                self.clients.insert(
                    client.clone(),
                    ClientTrack {
                        wanted: true,
                        ..ClientTrack::default()
                    },
                );
            }
            None => {}
        }
    }

    /// Tracks a lease that is not (or no longer) streamed to anyone: leases made on the command
    /// line, leases found live at start-up. It is revoked at `revoke_at_ms`.
    pub fn track(&mut self, lease_id: &str, client: &str, expires_at_ms: u64, revoke_at_ms: u64) {
        self.leases.insert(
            lease_id.to_owned(),
            LeaseTrack {
                client: client.to_owned(),
                expires_at_ms,
                renew_at_ms: expires_at_ms,
                revoke_at_ms: revoke_at_ms.min(expires_at_ms),
                in_flight: false,
                failures: 0,
            },
        );
    }

    /// Tracks a lease whose revocation failed once already (found at start-up): it is retried
    /// after the backoff for `failures`.
    pub fn track_failed(&mut self, lease_id: &str, client: &str, failures: u32, now_ms: u64) {
        let at = now_ms + backoff(failures).as_millis() as u64;
        self.leases.insert(
            lease_id.to_owned(),
            LeaseTrack {
                client: client.to_owned(),
                expires_at_ms: now_ms,
                renew_at_ms: now_ms,
                revoke_at_ms: at,
                in_flight: false,
                failures,
            },
        );
    }

    /// The lease currently streamed to `client`.
    pub fn current(&self, client: &NodeName) -> Option<&str> {
        self.clients.get(client)?.current.as_deref()
    }

    /// True while the schedule tracks `client` (wanted, being made, or holding a lease).
    pub fn knows_client(&self, client: &NodeName) -> bool {
        self.clients.contains_key(client)
    }

    /// What is known about one lease.
    pub fn lease(&self, lease_id: &str) -> Option<TrackedLease> {
        let l = self.leases.get(lease_id)?;
        let current = NodeName::new(&l.client)
            .ok()
            .and_then(|c| self.current(&c).map(|cur| cur == lease_id))
            .unwrap_or(false);
        Some(TrackedLease {
            client: l.client.clone(),
            expires_at_ms: l.expires_at_ms,
            revoke_at_ms: l.revoke_at_ms,
            failures: l.failures,
            current,
        })
    }

    /// Ids of every tracked lease.
    pub fn lease_ids(&self) -> Vec<String> {
        self.leases.keys().cloned().collect()
    }

    /// Returns what is due at `now_ms` and marks it in flight.
    pub fn poll(&mut self, now_ms: u64) -> Vec<Action> {
        let mut out = Vec::new();
        // Expired current leases first, so that their clients get a replacement below.
        for (client, c) in self.clients.iter_mut() {
            if let Some(cur) = &c.current {
                let expired = self
                    .leases
                    .get(cur)
                    .is_none_or(|l| l.expires_at_ms <= now_ms);
                if expired {
                    out.push(Action::Withdraw {
                        client: client.clone(),
                        lease_id: cur.clone(),
                    });
                    c.current = None;
                }
            }
        }
        for (id, l) in self.leases.iter_mut() {
            if !l.in_flight && l.revoke_at_ms <= now_ms {
                l.in_flight = true;
                out.push(Action::Revoke {
                    lease_id: id.clone(),
                });
            }
        }
        for (client, c) in self.clients.iter_mut() {
            if !c.wanted || c.creating || c.retry_at_ms > now_ms {
                continue;
            }
            let due = match &c.current {
                None => true,
                Some(cur) => self.leases.get(cur).is_none_or(|l| l.renew_at_ms <= now_ms),
            };
            if due {
                c.creating = true;
                out.push(Action::Create {
                    client: client.clone(),
                });
            }
        }
        // Forget clients nobody wants and that hold nothing.
        self.clients
            .retain(|_, c| c.wanted || c.creating || c.current.is_some());
        out
    }

    /// The next time [`poll`](Self::poll) may have something to do, if any. Changes reported
    /// through the other methods (and [`set_wanted`](Self::set_wanted)) may make it earlier.
    pub fn next_deadline(&self) -> Option<u64> {
        let leases = self
            .leases
            .values()
            .filter(|l| !l.in_flight)
            .map(|l| l.revoke_at_ms);
        let currents = self
            .clients
            .values()
            .filter_map(|c| c.current.as_ref())
            .filter_map(|id| self.leases.get(id))
            .map(|l| l.expires_at_ms);
        let clients = self
            .clients
            .values()
            .filter(|c| c.wanted && !c.creating)
            .map(|c| {
                let renew = c
                    .current
                    .as_ref()
                    .and_then(|id| self.leases.get(id))
                    .map(|l| l.renew_at_ms)
                    .unwrap_or(0);
                renew.max(c.retry_at_ms)
            });
        leases.chain(currents).chain(clients).min()
    }

    /// A lease was made for `client` (in answer to [`Action::Create`]). It becomes the current
    /// one; the previous current lease, if any, is returned and will be revoked after the
    /// grace period (or at its expiry, if sooner).
    pub fn created(
        &mut self,
        client: &NodeName,
        lease_id: &str,
        created_at_ms: u64,
        expires_at_ms: u64,
        now_ms: u64,
    ) -> Option<String> {
        self.leases.insert(
            lease_id.to_owned(),
            LeaseTrack {
                client: client.to_string(),
                expires_at_ms,
                renew_at_ms: Policy::renew_at(created_at_ms, expires_at_ms),
                revoke_at_ms: expires_at_ms,
                in_flight: false,
                failures: 0,
            },
        );
        let c = self.clients.entry(client.clone()).or_default();
        c.creating = false;
        c.failures = 0;
        c.retry_at_ms = 0;
        let old = c.current.replace(lease_id.to_owned());
        if let Some(old_id) = &old {
            if let Some(l) = self.leases.get_mut(old_id) {
                // The grace of the lease's own lifetime: profiles give leases different ones.
                let life = Duration::from_millis(expires_at_ms.saturating_sub(created_at_ms));
                l.revoke_at_ms = l.revoke_at_ms.min(now_ms + Policy::new(life).grace_ms);
            }
        }
        old
    }

    /// Making a lease for `client` failed; it is retried after a backoff. Returns the number
    /// of consecutive failures.
    pub fn create_failed(&mut self, client: &NodeName, now_ms: u64) -> u32 {
        let c = self.clients.entry(client.clone()).or_default();
        c.creating = false;
        c.failures = c.failures.saturating_add(1);
        c.retry_at_ms = now_ms + backoff(c.failures).as_millis() as u64;
        c.failures
    }

    /// Claims a lease for revocation outside [`poll`](Self::poll) (the command line). Returns
    /// false if a revocation is already in flight. An untracked lease is claimed trivially.
    /// If it is a client's current lease, the client loses it (and gets a new one if wanted).
    pub fn begin_revoke(&mut self, lease_id: &str) -> bool {
        if let Some(l) = self.leases.get_mut(lease_id) {
            if l.in_flight {
                return false;
            }
            l.in_flight = true;
        }
        for c in self.clients.values_mut() {
            if c.current.as_deref() == Some(lease_id) {
                c.current = None;
            }
        }
        true
    }

    /// A lease was revoked (or found gone): forget it.
    pub fn revoked(&mut self, lease_id: &str) {
        self.leases.remove(lease_id);
        for c in self.clients.values_mut() {
            if c.current.as_deref() == Some(lease_id) {
                c.current = None;
            }
        }
    }

    /// Revoking a lease failed; it is retried after a backoff and never forgotten. Returns the
    /// number of consecutive failures.
    pub fn revoke_failed(&mut self, lease_id: &str, client: &str, now_ms: u64) -> u32 {
        let l = self
            .leases
            .entry(lease_id.to_owned())
            .or_insert_with(|| LeaseTrack {
                client: client.to_owned(),
                expires_at_ms: now_ms,
                renew_at_ms: now_ms,
                revoke_at_ms: now_ms,
                in_flight: true,
                failures: 0,
            });
        l.in_flight = false;
        l.failures = l.failures.saturating_add(1);
        l.revoke_at_ms = now_ms + backoff(l.failures).as_millis() as u64;
        l.failures
    }

    /// Whatever waits out a backoff after a failure (a revocation, a client's lease) is due at
    /// `now_ms` instead: the cause of the failures is gone (the lease store writes again), and
    /// a credential must not outlive its expiry by a backoff that no longer means anything.
    /// Failure counts are kept, so a new failure backs off as before.
    pub fn retry_failed_now(&mut self, now_ms: u64) {
        for l in self.leases.values_mut() {
            if l.failures > 0 && !l.in_flight {
                l.revoke_at_ms = l.revoke_at_ms.min(now_ms);
            }
        }
        for c in self.clients.values_mut() {
            if c.failures > 0 && !c.creating {
                c.retry_at_ms = c.retry_at_ms.min(now_ms);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1000;

    fn name(s: &str) -> NodeName {
        NodeName::new(s).expect("name")
    }

    /// A virtual world: the schedule plus a fake backend that succeeds unless told otherwise.
    struct World {
        sched: Schedule,
        now: u64,
        next_id: u32,
        live: Vec<String>,
        fail_revokes: bool,
        fail_creates: bool,
        log: Vec<(u64, Action)>,
    }

    impl World {
        fn new(ttl_s: u64) -> Self {
            World {
                sched: Schedule::new(Policy::new(Duration::from_secs(ttl_s))),
                now: 1_000_000,
                next_id: 0,
                live: Vec::new(),
                fail_revokes: false,
                fail_creates: false,
                log: Vec::new(),
            }
        }

        /// Polls and carries out every action at the current time.
        fn step(&mut self) {
            loop {
                let actions = self.sched.poll(self.now);
                if actions.is_empty() {
                    return;
                }
                for a in actions {
                    self.log.push((self.now, a.clone()));
                    match a {
                        Action::Create { client } => {
                            if self.fail_creates {
                                self.sched.create_failed(&client, self.now);
                                continue;
                            }
                            self.next_id += 1;
                            let id = format!("l{}", self.next_id);
                            self.live.push(id.clone());
                            let expires = self.now + self.sched.policy().ttl_ms;
                            self.sched
                                .created(&client, &id, self.now, expires, self.now);
                        }
                        Action::Revoke { lease_id } => {
                            if self.fail_revokes {
                                self.sched.revoke_failed(&lease_id, "c", self.now);
                            } else {
                                self.live.retain(|l| *l != lease_id);
                                self.sched.revoked(&lease_id);
                            }
                        }
                        Action::Withdraw { .. } => {}
                    }
                }
            }
        }

        /// Advances the virtual clock deadline by deadline up to `until`.
        fn run_until(&mut self, until: u64) {
            self.step();
            while let Some(d) = self.sched.next_deadline() {
                if d > until {
                    break;
                }
                self.now = self.now.max(d);
                self.step();
            }
            self.now = until;
            self.step();
        }

        fn at(&self, t0: u64, a: &Action) -> Vec<u64> {
            self.log
                .iter()
                .filter(|(_, x)| x == a)
                .map(|(t, _)| t - t0)
                .collect()
        }
    }

    #[test]
    fn policy_grace_is_a_third_capped_at_30s() {
        assert_eq!(Policy::new(Duration::from_secs(3)).grace_ms, 1000);
        assert_eq!(Policy::new(Duration::from_secs(3600)).grace_ms, 30_000);
        assert_eq!(Policy::renew_at(0, 3000), 2000);
    }

    #[test]
    fn backoff_doubles_and_caps() {
        assert_eq!(backoff(1), Duration::from_secs(1));
        assert_eq!(backoff(2), Duration::from_secs(2));
        assert_eq!(backoff(4), Duration::from_secs(8));
        assert_eq!(backoff(10), BACKOFF_MAX);
        assert_eq!(backoff(u32::MAX), BACKOFF_MAX);
    }

    #[test]
    fn renews_at_two_thirds_and_revokes_old_after_grace() {
        let mut w = World::new(30);
        let t0 = w.now;
        let c = name("inlet-a");
        w.sched.set_wanted(&c, true);
        w.run_until(t0 + 65 * S);
        // Created at 0, renewed at 20 s and 40 s, 60 s.
        assert_eq!(
            w.at(t0, &Action::Create { client: c.clone() }),
            vec![0, 20 * S, 40 * S, 60 * S]
        );
        // Each superseded lease revoked 10 s (ttl/3) after its successor was issued, which is
        // exactly its own expiry here.
        assert_eq!(
            w.at(
                t0,
                &Action::Revoke {
                    lease_id: "l1".into()
                }
            ),
            vec![30 * S]
        );
        assert_eq!(
            w.at(
                t0,
                &Action::Revoke {
                    lease_id: "l2".into()
                }
            ),
            vec![50 * S]
        );
        assert_eq!(w.sched.current(&c), Some("l4"));
        // l3 is in its grace period; everything older is gone.
        assert_eq!(w.live, vec!["l3".to_string(), "l4".to_string()]);
    }

    #[test]
    fn grace_is_capped_at_30s_for_long_ttls() {
        let mut w = World::new(3600);
        let t0 = w.now;
        let c = name("inlet-a");
        w.sched.set_wanted(&c, true);
        w.run_until(t0 + 2500 * S);
        assert_eq!(
            w.at(t0, &Action::Create { client: c.clone() }),
            vec![0, 2400 * S]
        );
        assert_eq!(
            w.at(
                t0,
                &Action::Revoke {
                    lease_id: "l1".into()
                }
            ),
            vec![2430 * S]
        );
    }

    #[test]
    fn unwanted_client_is_not_renewed_and_lease_is_revoked_at_expiry() {
        let mut w = World::new(30);
        let t0 = w.now;
        let c = name("inlet-a");
        w.sched.set_wanted(&c, true);
        w.step();
        w.now = t0 + 5 * S;
        w.sched.set_wanted(&c, false);
        w.run_until(t0 + 100 * S);
        assert_eq!(w.at(t0, &Action::Create { client: c.clone() }), vec![0]);
        assert_eq!(
            w.at(
                t0,
                &Action::Withdraw {
                    client: c.clone(),
                    lease_id: "l1".into()
                }
            ),
            vec![30 * S]
        );
        assert_eq!(
            w.at(
                t0,
                &Action::Revoke {
                    lease_id: "l1".into()
                }
            ),
            vec![30 * S]
        );
        assert!(w.live.is_empty());
        assert_eq!(w.sched.next_deadline(), None);
    }

    #[test]
    fn resubscribing_before_expiry_resumes_renewal() {
        let mut w = World::new(30);
        let t0 = w.now;
        let c = name("inlet-a");
        w.sched.set_wanted(&c, true);
        w.step();
        w.sched.set_wanted(&c, false);
        w.run_until(t0 + 25 * S);
        assert_eq!(w.at(t0, &Action::Create { client: c.clone() }), vec![0]);
        // Past the renewal point: renewed at once, and the old lease revoked at its expiry.
        w.sched.set_wanted(&c, true);
        w.run_until(t0 + 31 * S);
        assert_eq!(
            w.at(t0, &Action::Create { client: c.clone() }),
            vec![0, 25 * S]
        );
        assert_eq!(
            w.at(
                t0,
                &Action::Revoke {
                    lease_id: "l1".into()
                }
            ),
            vec![30 * S]
        );
    }

    #[test]
    fn failed_revocations_are_retried_with_backoff_and_never_dropped() {
        let mut w = World::new(3);
        let t0 = w.now;
        w.sched.track("m1", "cli", t0 + 3 * S, t0 + 3 * S);
        w.fail_revokes = true;
        w.run_until(t0 + 3 * S + 16 * S);
        // Tries at expiry, then +1, +2, +4, +8 s.
        assert_eq!(
            w.at(
                t0,
                &Action::Revoke {
                    lease_id: "m1".into()
                }
            ),
            vec![3 * S, 4 * S, 6 * S, 10 * S, 18 * S]
        );
        assert_eq!(w.sched.lease("m1").map(|l| l.failures), Some(5));
        w.fail_revokes = false;
        w.run_until(t0 + 60 * S);
        assert_eq!(w.sched.lease("m1"), None);
    }

    #[test]
    fn retry_failed_now_cuts_every_backoff_short_and_keeps_the_counts() {
        let mut w = World::new(3);
        let t0 = w.now;
        let c = name("inlet-a");
        w.sched.track("m1", "cli", t0 + 3 * S, t0 + 3 * S);
        w.sched.set_wanted(&c, true);
        w.fail_revokes = true;
        w.fail_creates = true;
        // Revocation tried at 3, 4, 6, 10 s; next at 18 s. Creation at 0, 1, 3, 7 s; next at 15 s.
        w.run_until(t0 + 11 * S);
        assert_eq!(
            w.sched.lease("m1").map(|l| l.revoke_at_ms),
            Some(t0 + 18 * S)
        );
        w.fail_revokes = false;
        w.fail_creates = false;
        w.now = t0 + 12 * S;
        w.sched.retry_failed_now(w.now);
        assert_eq!(w.sched.next_deadline(), Some(w.now));
        w.step();
        let revoked = Action::Revoke {
            lease_id: "m1".into(),
        };
        assert_eq!(w.at(t0, &revoked).last(), Some(&(12 * S)));
        assert_eq!(w.sched.lease("m1"), None);
        assert_eq!(
            w.at(t0, &Action::Create { client: c.clone() }).last(),
            Some(&(12 * S))
        );
        assert_eq!(w.sched.current(&c), Some("l1"));
        // Nothing that did not fail is moved: the new lease renews at two thirds as usual.
        w.sched.retry_failed_now(w.now);
        assert_eq!(w.sched.next_deadline(), Some(t0 + 14 * S));
    }

    #[test]
    fn failed_creations_back_off_and_expiry_withdraws_the_grant() {
        let mut w = World::new(3);
        let t0 = w.now;
        let c = name("inlet-a");
        w.sched.set_wanted(&c, true);
        w.step();
        w.fail_creates = true;
        w.run_until(t0 + 10 * S);
        // Renewal at 2 s fails; retried at 3 s, 5 s, 9 s. The lease is withdrawn at expiry.
        assert_eq!(
            w.at(t0, &Action::Create { client: c.clone() }),
            vec![0, 2 * S, 3 * S, 5 * S, 9 * S]
        );
        assert_eq!(
            w.at(
                t0,
                &Action::Withdraw {
                    client: c.clone(),
                    lease_id: "l1".into()
                }
            ),
            vec![3 * S]
        );
        assert_eq!(w.sched.current(&c), None);
        // The next retry (at 17 s) succeeds.
        w.fail_creates = false;
        w.run_until(t0 + 18 * S);
        assert_eq!(w.sched.current(&c), Some("l2"));
    }

    #[test]
    fn command_line_revoke_takes_the_current_lease_away() {
        let mut w = World::new(30);
        let t0 = w.now;
        let c = name("inlet-a");
        w.sched.set_wanted(&c, true);
        w.step();
        assert!(w.sched.begin_revoke("l1"));
        assert!(
            !w.sched.begin_revoke("l1"),
            "second claim refused while in flight"
        );
        assert_eq!(w.sched.current(&c), None);
        w.sched.revoked("l1");
        w.step();
        // Still wanted: a new lease at once.
        assert_eq!(w.sched.current(&c), Some("l2"));
        assert_eq!(w.now, t0);
    }

    #[test]
    fn tracked_leases_are_revoked_at_their_time() {
        let mut w = World::new(30);
        let t0 = w.now;
        w.sched.track("m1", "cli", t0 + 10 * S, t0 + 10 * S);
        w.sched.track("m2", "cli", t0 + 5 * S, t0 + 50 * S);
        assert_eq!(w.sched.next_deadline(), Some(t0 + 5 * S));
        w.run_until(t0 + 20 * S);
        assert_eq!(
            w.at(
                t0,
                &Action::Revoke {
                    lease_id: "m2".into()
                }
            ),
            vec![5 * S]
        );
        assert_eq!(
            w.at(
                t0,
                &Action::Revoke {
                    lease_id: "m1".into()
                }
            ),
            vec![10 * S]
        );
    }
}
