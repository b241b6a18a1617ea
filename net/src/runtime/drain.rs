//! Graceful shutdown: after the shutdown signal a node stops taking new work, then waits (up to
//! a deadline) for the work it already took — streams tracked in a [`TaskTracker`] — before it
//! closes its connections.

use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long open streams may take to finish after SIGTERM/SIGINT, unless `--drain-timeout`
/// says otherwise.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// The drain timeout a process runs with: the `--drain-timeout` flag's, else the config file's
/// `drain-timeout` key (parsed here), else [`DEFAULT_DRAIN_TIMEOUT`]. The relay, the outlet and
/// the inlet merge it the same way. The error is the file value's parse error (the caller says
/// which file).
pub fn drain_timeout(flag: Option<Duration>, file: Option<&str>) -> Result<Duration, String> {
    match (flag, file) {
        (Some(d), _) => Ok(d),
        (None, Some(text)) => crate::runtime::duration::parse_duration(text),
        (None, None) => Ok(DEFAULT_DRAIN_TIMEOUT),
    }
}

/// A node's graceful-shutdown state: whether it has begun, and the work it took that may still
/// finish. Cloned into every task that takes work, so each can refuse new work once draining
/// and hold a token while its work lasts.
#[derive(Clone, Default)]
pub struct Drain {
    /// Cancelled when shutdown begins: new work (client connections, routes, streams) is
    /// refused from then on.
    pub draining: CancellationToken,
    /// One token per open stream (the outlet's data streams, the inlet's client connections;
    /// not lease streams, which last as long as their connection), from its start until it
    /// ends.
    pub streams: TaskTracker,
}

/// Waits until every task in `tracker` is done, at most `timeout`; returns how many were still
/// running at the deadline (they are cut off when the node closes its endpoint). `what` names
/// the tasks in the logs.
pub async fn drain(tracker: &TaskTracker, timeout: Duration, what: &str) -> usize {
    tracker.close();
    let open = tracker.len();
    if open == 0 {
        return 0;
    }
    tracing::info!(open, deadline = ?timeout, "draining: waiting for open {what} to finish");
    match tokio::time::timeout(timeout, tracker.wait()).await {
        Ok(()) => {
            tracing::info!("drained: every open {what} finished");
            0
        }
        Err(_) => {
            let left = tracker.len();
            tracing::warn!(left, "drain deadline passed; closing the {what} still open");
            left
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drain_timeout_takes_the_flag_then_the_file_then_the_default() {
        let flag = Some(Duration::from_secs(3));
        assert_eq!(drain_timeout(flag, Some("1m")), Ok(Duration::from_secs(3)));
        assert_eq!(drain_timeout(None, Some("1m")), Ok(Duration::from_secs(60)));
        assert_eq!(
            drain_timeout(None, Some("250ms")),
            Ok(Duration::from_millis(250))
        );
        assert_eq!(drain_timeout(None, None), Ok(DEFAULT_DRAIN_TIMEOUT));
        // A bad file value is refused even though the default would do, and named.
        let err = drain_timeout(None, Some("soon")).expect_err("bad duration");
        assert!(err.contains("\"soon\""), "{err}");
        // The flag wins: a bad file value it overrides is not looked at.
        assert_eq!(
            drain_timeout(flag, Some("soon")),
            Ok(Duration::from_secs(3))
        );
    }

    #[tokio::test]
    async fn drain_waits_for_tasks_then_gives_up_at_the_deadline() {
        let tracker = TaskTracker::new();
        tracker.spawn(tokio::time::sleep(Duration::from_millis(50)));
        let started = std::time::Instant::now();
        assert_eq!(drain(&tracker, Duration::from_secs(10), "streams").await, 0);
        assert!(started.elapsed() < Duration::from_secs(5));

        let tracker = TaskTracker::new();
        tracker.spawn(tokio::time::sleep(Duration::from_millis(50)));
        tracker.spawn(tokio::time::sleep(Duration::from_secs(60)));
        let started = std::time::Instant::now();
        assert_eq!(
            drain(&tracker, Duration::from_millis(300), "streams").await,
            1
        );
        assert!(started.elapsed() >= Duration::from_millis(300));
    }
}
