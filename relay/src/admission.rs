//! Who may start a QUIC handshake with the relay, decided before quinn allocates anything.
//!
//! A QUIC Initial is a single UDP datagram with a forgeable source address, and accepting it
//! costs the relay a TLS handshake and ~70 KB of connection state. So, for each
//! [`quinn::Incoming`]:
//!
//! 1. An unproven source address is answered with a stateless Retry ([`RetryPolicy`]) when the
//!    relay is under load (too many handshakes pending, or its handshake budget running low) or
//!    this source is over its own budget. The Retry is smaller than the Initial that caused it
//!    and keeps no state, so a spoofed flood costs one AEAD seal per datagram and nothing more.
//! 2. A hard cap on handshakes in progress: above it the attempt is dropped silently (an honest
//!    client retransmits its Initial).
//! 3. A token bucket per source IP (so one host cannot take the whole budget) and one in total.
//!    Only proven addresses, or unproven ones accepted while the relay is idle, draw from a
//!    source's bucket, so spoofing a node's address cannot spend that node's budget.
//!
//! The per-source table is bounded: when full, idle entries are swept, and if it is still full
//! new sources share one overflow bucket.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// When to answer an unproven source with a Retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryPolicy {
    /// Always: one more round trip for every node, no state ever for a spoofed address.
    Always,
    /// Only when the relay is under load or the source is over its budget (the default): a
    /// reconnecting node pays the extra round trip only while the relay is being flooded.
    UnderLoad,
    /// Never (tests of the caps alone).
    Never,
}

/// Bounds on handshakes; see the module docs.
#[derive(Debug, Clone)]
pub struct HandshakeLimits {
    pub retry: RetryPolicy,
    /// Pending handshakes at or above which unproven sources get a Retry (under `UnderLoad`).
    pub retry_above_pending: usize,
    /// Hard cap on handshakes (and enrollment exchanges) in progress.
    pub max_pending: usize,
    /// Handshakes per second one source IP may start, sustained.
    pub per_source_rate: f64,
    /// Burst allowed above `per_source_rate`.
    pub per_source_burst: f64,
    /// Handshakes per second in total, sustained.
    pub total_rate: f64,
    /// Burst allowed above `total_rate`.
    pub total_burst: f64,
    /// Source IPs tracked at once.
    pub max_sources: usize,
    /// How long a handshake (or an enrollment exchange) may take before it is dropped.
    pub timeout: Duration,
}

impl Default for HandshakeLimits {
    fn default() -> Self {
        Self {
            retry: RetryPolicy::UnderLoad,
            retry_above_pending: 16,
            max_pending: 256,
            per_source_rate: 20.0,
            per_source_burst: 50.0,
            total_rate: 500.0,
            total_burst: 1000.0,
            max_sources: 16_384,
            timeout: Duration::from_secs(5),
        }
    }
}

/// Counters of handshake admission; exported as metrics.
#[derive(Debug, Default)]
pub struct AdmissionStats {
    /// Handshakes let through to quinn.
    pub accepted: AtomicU64,
    /// Stateless Retries sent.
    pub retried: AtomicU64,
    /// Dropped: the cap on pending handshakes was reached.
    pub refused_pending: AtomicU64,
    /// Dropped: the source was over its rate.
    pub refused_source_rate: AtomicU64,
    /// Dropped: the relay was over its total rate.
    pub refused_total_rate: AtomicU64,
    /// Handshakes in progress (gauge).
    pub pending: AtomicUsize,
    /// The most handshakes that were ever in progress at once (gauge).
    pub pending_peak: AtomicUsize,
}

/// What to do with one incoming connection attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Accept,
    Retry,
    /// Drop without an answer, for this reason (a metrics/log label).
    Ignore(&'static str),
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn full(burst: f64, now: Instant) -> Self {
        Self {
            tokens: burst,
            at: now,
        }
    }

    fn refill(&mut self, rate: f64, burst: f64, now: Instant) {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + dt * rate).min(burst);
        self.at = now;
    }
}

struct Buckets {
    total: Bucket,
    sources: HashMap<IpAddr, Bucket>,
    /// Shared by new sources while the table is full.
    overflow: Bucket,
}

/// Admission state; see the module docs.
pub struct Admission {
    limits: HandshakeLimits,
    stats: Arc<AdmissionStats>,
    buckets: Mutex<Buckets>,
}

/// Held while one admitted handshake is in progress; frees its slot when dropped.
#[derive(Debug)]
pub struct Pending(Arc<AdmissionStats>);

impl Drop for Pending {
    fn drop(&mut self) {
        self.0.pending.fetch_sub(1, Relaxed);
    }
}

impl Admission {
    pub fn new(limits: HandshakeLimits, stats: Arc<AdmissionStats>) -> Self {
        let now = Instant::now();
        Self {
            buckets: Mutex::new(Buckets {
                total: Bucket::full(limits.total_burst, now),
                sources: HashMap::new(),
                overflow: Bucket::full(limits.per_source_burst, now),
            }),
            limits,
            stats,
        }
    }

    pub fn limits(&self) -> &HandshakeLimits {
        &self.limits
    }

    /// Decides for one attempt from `ip`; `validated`: the address is proven (a valid Retry
    /// token came back); `may_retry`: a Retry is still allowed for this attempt.
    pub fn decide(&self, ip: IpAddr, validated: bool, may_retry: bool, now: Instant) -> Decision {
        let l = &self.limits;
        let pending = self.stats.pending.load(Relaxed);
        let mut b = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        b.total.refill(l.total_rate, l.total_burst, now);
        // A look only: attempts that are turned away leave no entry behind.
        let source_ok = match b.sources.get(&ip) {
            Some(s) => {
                let mut s = *s;
                s.refill(l.per_source_rate, l.per_source_burst, now);
                s.tokens >= 1.0
            }
            None if b.sources.len() >= l.max_sources => {
                let mut o = b.overflow;
                o.refill(l.per_source_rate, l.per_source_burst, now);
                o.tokens >= 1.0
            }
            None => true,
        };
        let total_ok = b.total.tokens >= 1.0;
        if !validated && may_retry {
            let loaded = pending >= l.retry_above_pending
                || b.total.tokens < l.total_burst / 2.0
                || !source_ok;
            let retry = match l.retry {
                RetryPolicy::Always => true,
                RetryPolicy::UnderLoad => loaded,
                RetryPolicy::Never => false,
            };
            if retry {
                return Decision::Retry;
            }
        }
        if pending >= l.max_pending {
            return Decision::Ignore("pending_cap");
        }
        if !source_ok {
            return Decision::Ignore("source_rate");
        }
        if !total_ok {
            return Decision::Ignore("total_rate");
        }
        source_bucket(&mut b, l, ip, now).tokens -= 1.0;
        b.total.tokens -= 1.0;
        Decision::Accept
    }

    /// Takes a pending slot for an accepted handshake.
    pub fn admit(&self) -> Pending {
        let now = self.stats.pending.fetch_add(1, Relaxed) + 1;
        self.stats.pending_peak.fetch_max(now, Relaxed);
        Pending(self.stats.clone())
    }

    /// Counts a decision that was carried out.
    pub fn count(&self, d: Decision) {
        let s = &self.stats;
        match d {
            Decision::Accept => s.accepted.fetch_add(1, Relaxed),
            Decision::Retry => s.retried.fetch_add(1, Relaxed),
            Decision::Ignore("pending_cap") => s.refused_pending.fetch_add(1, Relaxed),
            Decision::Ignore("source_rate") => s.refused_source_rate.fetch_add(1, Relaxed),
            Decision::Ignore(_) => s.refused_total_rate.fetch_add(1, Relaxed),
        };
    }
}

/// The bucket of `ip`, refilled to `now`; the overflow bucket when the table is full.
fn source_bucket<'a>(
    b: &'a mut Buckets,
    l: &HandshakeLimits,
    ip: IpAddr,
    now: Instant,
) -> &'a mut Bucket {
    if !b.sources.contains_key(&ip) && b.sources.len() >= l.max_sources {
        // Entries that would be full again carry no information: drop them.
        let idle = Duration::from_secs_f64(l.per_source_burst / l.per_source_rate.max(0.001));
        b.sources
            .retain(|_, v| now.saturating_duration_since(v.at) < idle);
    }
    if !b.sources.contains_key(&ip) && b.sources.len() >= l.max_sources {
        b.overflow
            .refill(l.per_source_rate, l.per_source_burst, now);
        return &mut b.overflow;
    }
    let e = b
        .sources
        .entry(ip)
        .or_insert_with(|| Bucket::full(l.per_source_burst, now));
    e.refill(l.per_source_rate, l.per_source_burst, now);
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admission(limits: HandshakeLimits) -> Admission {
        Admission::new(limits, Arc::default())
    }

    fn ip(n: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, n])
    }

    #[test]
    fn unproven_sources_get_a_retry_once_handshakes_pile_up() {
        let a = admission(HandshakeLimits::default());
        let now = Instant::now();
        let mut held = Vec::new();
        for _ in 0..16 {
            assert_eq!(a.decide(ip(2), false, true, now), Decision::Accept);
            held.push(a.admit());
        }
        // Under load: a Retry for the unproven, still a handshake for the proven.
        assert_eq!(a.decide(ip(3), false, true, now), Decision::Retry);
        assert_eq!(a.decide(ip(3), true, false, now), Decision::Accept);
        held.clear();
        assert_eq!(a.decide(ip(3), false, true, now), Decision::Accept);
    }

    #[test]
    fn pending_handshakes_are_capped() {
        let a = admission(HandshakeLimits {
            max_pending: 4,
            ..HandshakeLimits::default()
        });
        let now = Instant::now();
        let held: Vec<_> = (0..4)
            .map(|i| {
                assert_eq!(a.decide(ip(i), true, false, now), Decision::Accept);
                a.admit()
            })
            .collect();
        assert_eq!(
            a.decide(ip(9), true, false, now),
            Decision::Ignore("pending_cap")
        );
        drop(held);
        assert_eq!(a.decide(ip(9), true, false, now), Decision::Accept);
    }

    #[test]
    fn one_source_cannot_take_the_whole_budget_and_refills_over_time() {
        let a = admission(HandshakeLimits {
            per_source_rate: 10.0,
            per_source_burst: 5.0,
            ..HandshakeLimits::default()
        });
        let t0 = Instant::now();
        for _ in 0..5 {
            assert_eq!(a.decide(ip(2), true, false, t0), Decision::Accept);
        }
        assert_eq!(
            a.decide(ip(2), true, false, t0),
            Decision::Ignore("source_rate")
        );
        // Over budget and unproven: a Retry, not a silent drop (it may be a spoofed copy).
        assert_eq!(a.decide(ip(2), false, true, t0), Decision::Retry);
        // Another source is unaffected.
        assert_eq!(a.decide(ip(1), true, false, t0), Decision::Accept);
        // 100 ms later one more token.
        let t1 = t0 + Duration::from_millis(100);
        assert_eq!(a.decide(ip(2), true, false, t1), Decision::Accept);
        assert_eq!(
            a.decide(ip(2), true, false, t1),
            Decision::Ignore("source_rate")
        );
    }

    #[test]
    fn total_rate_bounds_many_sources() {
        let a = admission(HandshakeLimits {
            total_rate: 1.0,
            total_burst: 10.0,
            ..HandshakeLimits::default()
        });
        let now = Instant::now();
        for i in 0..10 {
            assert_eq!(a.decide(ip(i), true, false, now), Decision::Accept);
        }
        assert_eq!(
            a.decide(ip(200), true, false, now),
            Decision::Ignore("total_rate")
        );
    }

    #[test]
    fn spoofed_unproven_attempts_do_not_spend_a_sources_budget() {
        let a = admission(HandshakeLimits {
            retry: RetryPolicy::Always,
            per_source_burst: 2.0,
            ..HandshakeLimits::default()
        });
        let now = Instant::now();
        for _ in 0..1000 {
            assert_eq!(a.decide(ip(7), false, true, now), Decision::Retry);
        }
        assert_eq!(a.decide(ip(7), true, false, now), Decision::Accept);
    }

    #[test]
    fn the_source_table_stays_bounded() {
        let a = admission(HandshakeLimits {
            max_sources: 8,
            per_source_burst: 1.0,
            ..HandshakeLimits::default()
        });
        let now = Instant::now();
        for i in 0..100u8 {
            let _ = a.decide(ip(i), true, false, now);
        }
        let b = a.buckets.lock().expect("lock");
        assert!(b.sources.len() <= 8, "{}", b.sources.len());
    }
}
