//! Log lines that cannot flood: refusals are logged once per reason per interval, with a count.
//!
//! Anything an unauthenticated peer can trigger at will (a junk datagram, a failed handshake, a
//! refused link) must not cost a log line each: at line rate that is hundreds of MB of log an
//! hour and disk I/O on the relay's hot path. The exact figures live in the metrics counters;
//! the log only needs to say that it happens, why, and roughly how often.
//!
//! [`RateLog::hit`] lets the first event of a reason through at once (with its detail, so an
//! operator sees a fresh problem immediately) and then counts; the next line for that reason
//! comes no sooner than one interval later and carries the count of everything since the last
//! line. [`RateLog::due`] hands out the counts still held back when events stop, so a flood's
//! tail is reported too: [`spawn_flusher`] calls it on a timer. The set of reasons is the set of
//! `&'static str` the code passes in, so the state is bounded whatever arrives.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

/// How often at most one line per reason is written by [`refusals`].
pub const SUMMARY_INTERVAL: Duration = Duration::from_secs(10);

/// Where the time comes from; tests inject a virtual clock.
pub type Clock = Arc<dyn Fn() -> Instant + Send + Sync>;

#[derive(Debug, Clone, Copy)]
struct Entry {
    /// When the last line for this reason was written.
    last_line: Instant,
    /// Events since that line.
    held: u64,
}

/// Per-reason rate limiter for log lines; see the module docs.
pub struct RateLog {
    interval: Duration,
    clock: Clock,
    entries: Mutex<HashMap<&'static str, Entry>>,
}

impl std::fmt::Debug for RateLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLog")
            .field("interval", &self.interval)
            .finish_non_exhaustive()
    }
}

impl RateLog {
    /// A limiter on the real clock.
    pub fn new(interval: Duration) -> Self {
        Self::with_clock(interval, Arc::new(Instant::now))
    }

    /// A limiter on the given clock.
    pub fn with_clock(interval: Duration, clock: Clock) -> Self {
        Self {
            interval,
            clock,
            entries: Mutex::default(),
        }
    }

    /// The summary interval.
    pub fn interval(&self) -> Duration {
        self.interval
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<&'static str, Entry>> {
        // The map holds plain counters, valid between any two statements.
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records one event of `reason`. `Some(n)`: write a line now, standing for `n` events
    /// (this one included); `None`: counted, stay quiet.
    pub fn hit(&self, reason: &'static str) -> Option<u64> {
        let now = (self.clock)();
        let mut entries = self.entries();
        match entries.get_mut(reason) {
            None => {
                entries.insert(
                    reason,
                    Entry {
                        last_line: now,
                        held: 0,
                    },
                );
                Some(1)
            }
            Some(e) if now.saturating_duration_since(e.last_line) >= self.interval => {
                let n = e.held + 1;
                e.held = 0;
                e.last_line = now;
                Some(n)
            }
            Some(e) => {
                e.held += 1;
                None
            }
        }
    }

    /// Reasons whose held-back events have waited a whole interval, with their counts; each is
    /// reset as if its line had been written now.
    pub fn due(&self) -> Vec<(&'static str, u64)> {
        let now = (self.clock)();
        let mut out = Vec::new();
        for (reason, e) in self.entries().iter_mut() {
            if e.held > 0 && now.saturating_duration_since(e.last_line) >= self.interval {
                out.push((*reason, e.held));
                e.held = 0;
                e.last_line = now;
            }
        }
        out.sort_unstable();
        out
    }
}

/// The process-wide limiter for refusals (junk datagrams, failed handshakes, refused links).
pub fn refusals() -> &'static RateLog {
    static LOG: LazyLock<RateLog> = LazyLock::new(|| RateLog::new(SUMMARY_INTERVAL));
    &LOG
}

/// Logs a refusal at most once per reason per [`SUMMARY_INTERVAL`] through [`refusals`]:
/// `refusal!(warn, "reason", "message", field = value, ...)`. The fields are only evaluated
/// when a line is written; the line also carries `reason` and `count` (events it stands for).
#[macro_export]
macro_rules! refusal {
    ($level:ident, $reason:expr, $msg:literal $(, $($fields:tt)+)?) => {
        if let Some(count) = $crate::runtime::ratelog::refusals().hit($reason) {
            ::tracing::$level!(reason = $reason, count, $($($fields)+ ,)? $msg);
        }
    };
}

/// Writes the held-back counts of [`refusals`] every interval until `stop` is cancelled, so the
/// tail of a flood is reported. Harmless to start more than once (the counts go out once).
pub fn spawn_flusher(stop: tokio_util::sync::CancellationToken) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let log = refusals();
        let mut tick = tokio::time::interval(log.interval() / 2);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            for (reason, count) in log.due() {
                tracing::warn!(reason, count, "refused (summary of the last interval)");
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

    /// A clock that moves only when told (milliseconds past a fixed start).
    fn virtual_clock() -> (Clock, Arc<AtomicU64>) {
        let start = Instant::now();
        let ms = Arc::new(AtomicU64::new(0));
        let m = ms.clone();
        let clock: Clock = Arc::new(move || start + Duration::from_millis(m.load(Relaxed)));
        (clock, ms)
    }

    #[test]
    fn first_event_logs_then_one_line_per_interval_with_the_count() {
        let (clock, ms) = virtual_clock();
        let log = RateLog::with_clock(Duration::from_secs(10), clock);
        assert_eq!(log.hit("junk"), Some(1));
        let mut lines = Vec::new();
        // 10,000 events over 30 virtual seconds, 3 ms apart.
        for i in 1..=10_000u64 {
            ms.store(i * 3, Relaxed);
            if let Some(n) = log.hit("junk") {
                lines.push((i * 3, n));
            }
        }
        // 30 s of flood: a line at ~10 s and ~20 s (the next is due at ~30 s, just past the
        // end), each the first event a whole interval after the line before.
        assert_eq!(lines.len(), 2, "{lines:?}");
        let mut prev = 0;
        for (t, _) in &lines {
            assert!((10_000..10_003).contains(&(t - prev)), "{lines:?}");
            prev = *t;
        }
        // Together with the first line and what is still held, they account for every event.
        let total: u64 = 1 + lines.iter().map(|(_, n)| n).sum::<u64>();
        assert_eq!(total + log.entries()["junk"].held, 10_001);
    }

    #[test]
    fn reasons_are_limited_independently() {
        let (clock, ms) = virtual_clock();
        let log = RateLog::with_clock(Duration::from_secs(1), clock);
        assert_eq!(log.hit("a"), Some(1));
        assert_eq!(log.hit("b"), Some(1));
        assert_eq!(log.hit("a"), None);
        assert_eq!(log.hit("b"), None);
        ms.store(999, Relaxed);
        assert_eq!(log.hit("a"), None);
        ms.store(1000, Relaxed);
        assert_eq!(log.hit("a"), Some(3));
        assert_eq!(log.hit("b"), Some(2));
    }

    #[test]
    fn due_reports_the_tail_of_a_flood_once() {
        let (clock, ms) = virtual_clock();
        let log = RateLog::with_clock(Duration::from_secs(10), clock);
        assert_eq!(log.hit("junk"), Some(1));
        for _ in 0..41 {
            assert_eq!(log.hit("junk"), None);
        }
        // Not yet an interval since the first line: nothing due.
        ms.store(9_999, Relaxed);
        assert!(log.due().is_empty());
        ms.store(10_000, Relaxed);
        assert_eq!(log.due(), vec![("junk", 41)]);
        // Reported: not again, and the next event waits a new interval.
        ms.store(30_000, Relaxed);
        assert!(log.due().is_empty());
        assert_eq!(log.hit("junk"), Some(1));
        assert_eq!(log.hit("junk"), None);
    }
}
