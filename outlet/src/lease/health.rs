//! Whether the lease store can write, and when to try reopening it (see "A failed write" in
//! [`super::store`]). Kept apart from the store itself so that `/readyz` and the inlets' lease
//! streams can ask without waiting for the store's lock, which a slow write may hold.
//!
//! Like the schedule, it has no clock of its own: time is passed in as milliseconds since the
//! Unix epoch.

use std::time::Duration;

/// First delay before reopening a store that failed to write.
pub const REOPEN_MIN: Duration = Duration::from_millis(100);
/// Longest delay between attempts: once the disk has room again, the store (and the
/// revocations waiting on it) are back within this.
pub const REOPEN_MAX: Duration = Duration::from_secs(2);

/// Delay before the next reopening after `attempts` failed ones (100 ms doubling to 2 s).
pub fn reopen_backoff(attempts: u32) -> Duration {
    let exp = attempts.min(16);
    REOPEN_MIN.saturating_mul(1u32 << exp).min(REOPEN_MAX)
}

#[derive(Debug, Clone)]
struct Fault {
    reason: String,
    since_ms: u64,
    /// Failed reopenings since the store broke.
    attempts: u32,
    retry_at_ms: u64,
    reopening: bool,
}

/// The store's state as the manager sees it: writing, or broken since some time for some reason.
#[derive(Debug, Clone, Default)]
pub(super) struct StoreHealth {
    fault: Option<Fault>,
}

impl StoreHealth {
    /// A store operation failed in a way that closed the database. True if the store was
    /// writing until now (the first failure is worth a log line; the next ones are not).
    pub(super) fn failed(&mut self, reason: String, now_ms: u64) -> bool {
        if self.fault.is_some() {
            return false;
        }
        self.fault = Some(Fault {
            reason,
            since_ms: now_ms,
            attempts: 0,
            retry_at_ms: now_ms + reopen_backoff(0).as_millis() as u64,
            reopening: false,
        });
        true
    }

    /// True (and marks a reopening in flight) if it is time to try reopening the store.
    pub(super) fn take_due(&mut self, now_ms: u64) -> bool {
        match &mut self.fault {
            Some(f) if !f.reopening && f.retry_at_ms <= now_ms => {
                f.reopening = true;
                true
            }
            _ => false,
        }
    }

    /// When the next reopening is due, if one is waiting.
    pub(super) fn next_attempt(&self) -> Option<u64> {
        self.fault
            .as_ref()
            .filter(|f| !f.reopening)
            .map(|f| f.retry_at_ms)
    }

    /// The store was reopened and can write. Returns since when it could not, if it could not.
    pub(super) fn reopened(&mut self) -> Option<u64> {
        self.fault.take().map(|f| f.since_ms)
    }

    /// Reopening failed (`reason`: why); the next try is after a backoff. Returns the number of
    /// failed reopenings since the store broke.
    pub(super) fn reopen_failed(&mut self, reason: String, now_ms: u64) -> u32 {
        let f = self.fault.get_or_insert_with(|| Fault {
            reason: String::new(),
            since_ms: now_ms,
            attempts: 0,
            retry_at_ms: now_ms,
            reopening: false,
        });
        f.reason = reason;
        f.attempts = f.attempts.saturating_add(1);
        f.retry_at_ms = now_ms + reopen_backoff(f.attempts).as_millis() as u64;
        f.reopening = false;
        f.attempts
    }

    /// Why the store cannot write, for `/readyz` and the inlets; `None` while it can.
    pub(super) fn problem(&self, now_ms: u64) -> Option<String> {
        self.fault.as_ref().map(|f| {
            format!(
                "the outlet's lease store cannot write ({}) since {} s ago; it is reopened every {} s at most",
                f.reason,
                now_ms.saturating_sub(f.since_ms) / 1000,
                REOPEN_MAX.as_secs()
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reopen_backoff_doubles_from_100ms_and_caps_at_2s() {
        assert_eq!(reopen_backoff(0), Duration::from_millis(100));
        assert_eq!(reopen_backoff(1), Duration::from_millis(200));
        assert_eq!(reopen_backoff(3), Duration::from_millis(800));
        assert_eq!(reopen_backoff(5), REOPEN_MAX);
        assert_eq!(reopen_backoff(u32::MAX), REOPEN_MAX);
    }

    #[test]
    fn a_broken_store_is_retried_with_backoff_until_it_reopens() {
        let mut h = StoreHealth::default();
        assert!(h.problem(0).is_none());
        assert_eq!(h.next_attempt(), None);
        assert!(h.failed("No space left on device (os error 28)".into(), 1_000));
        // A second failure while broken changes nothing.
        assert!(!h.failed("Previous I/O error".into(), 1_050));
        let p = h.problem(3_500).expect("broken");
        assert!(
            p.contains("lease store cannot write (No space left on device (os error 28))")
                && p.contains("since 2 s"),
            "{p}"
        );
        assert!(!h.take_due(1_099));
        assert!(h.take_due(1_100));
        // In flight: not due again, and no deadline to wake for.
        assert!(!h.take_due(5_000));
        assert_eq!(h.next_attempt(), None);
        assert_eq!(h.reopen_failed("still full".into(), 1_200), 1);
        assert_eq!(h.next_attempt(), Some(1_400));
        assert!(h.problem(1_300).expect("broken").contains("(still full)"));
        assert!(h.take_due(1_400));
        assert_eq!(h.reopened(), Some(1_000));
        assert!(h.problem(2_000).is_none());
        assert_eq!(h.next_attempt(), None);
        assert!(!h.take_due(10_000));
        // Broken again later: a fresh start of the backoff.
        assert!(h.failed("again".into(), 20_000));
        assert_eq!(h.next_attempt(), Some(20_100));
    }
}
