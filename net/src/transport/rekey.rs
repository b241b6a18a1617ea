//! Key rotation on the end-to-end connection by a byte and time budget (QUIC key update,
//! RFC 9001 §6), so no traffic key protects more than a bounded amount of data or time.

use std::time::Duration;

/// When to roll the traffic keys.
#[derive(Debug, Clone, Copy)]
pub struct KeyBudget {
    /// Bytes sent or received under one key.
    pub bytes: u64,
    /// Time under one key.
    pub time: Duration,
}

impl Default for KeyBudget {
    fn default() -> Self {
        Self {
            bytes: 1 << 30,
            time: Duration::from_secs(3600),
        }
    }
}

/// How often the budget is checked.
const CHECK_EVERY: Duration = Duration::from_millis(500);

/// Rolls `conn`'s keys whenever the budget is spent, until the connection closes, counting
/// each update in `counter`.
pub async fn run(
    conn: quinn::Connection,
    budget: KeyBudget,
    counter: std::sync::Arc<std::sync::atomic::AtomicU64>,
) {
    let bytes = |c: &quinn::Connection| {
        let s = c.stats();
        s.udp_tx.bytes + s.udp_rx.bytes
    };
    let mut base = bytes(&conn);
    let mut since = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = conn.closed() => return,
            _ = tokio::time::sleep(CHECK_EVERY.min(budget.time)) => {}
        }
        let now = bytes(&conn);
        if now.saturating_sub(base) >= budget.bytes || since.elapsed() >= budget.time {
            conn.force_key_update();
            let n = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
            tracing::debug!(updates = n, "end-to-end traffic keys rotated");
            base = now;
            since = tokio::time::Instant::now();
        }
    }
}
