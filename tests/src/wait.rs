//! Waiting on a condition instead of sleeping a fixed time: a test that waits on what it needs
//! is as fast as the machine allows and fails, naming what it waited for, only when the thing
//! never happens.

use std::future::Future;
use std::time::{Duration, Instant};

/// Waits until `check` holds, polling every 50 ms for at most `within`; fails naming `what`.
pub async fn eventually<F, Fut>(within: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !check().await {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what} (waited {within:?})"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// [`eventually`] for a check that needs no awaiting (a counter, a flag), polled every 10 ms.
pub async fn wait_for(within: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !check() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what} (waited {within:?})"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
