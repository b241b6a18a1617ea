//! Graceful shutdown: after the shutdown signal a node stops taking new work, then waits (up to
//! a deadline) for the work it already took — streams tracked in a [`TaskTracker`] — before it
//! closes its connections.

use std::time::Duration;
use tokio_util::task::TaskTracker;

/// How long open streams may take to finish after SIGTERM/SIGINT, unless `--drain-timeout`
/// says otherwise.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

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
