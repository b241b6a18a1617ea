//! Keeps the etcd client's set of endpoints to the members that accept connections.
//!
//! The client balances requests over every configured endpoint and keeps a dead member in
//! that set (etcd-client#39): with one member of three down, about one request in three fails
//! with a connect error although the cluster has quorum. So the endpoints are checked here (a
//! TCP connect, the very step that fails) and a member that refuses connections is taken out
//! of the client's set until it accepts them again. The last endpoint is never taken out, so
//! errors still name etcd rather than "no endpoints".

use etcd_client::Client;
use std::collections::BTreeSet;
use std::sync::Weak;
use std::time::Duration;

/// How often the members are checked once running.
const INTERVAL: Duration = Duration::from_millis(500);
/// How long one connect may take before the member counts as down.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(400);

/// `host:port` of an endpoint URL (`http://10.0.0.1:2379` or a bare `10.0.0.1:2379`).
pub fn authority(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    rest.split('/').next().unwrap_or(rest)
}

/// Which endpoints to take out of, and put back into, the client's set, given which accept
/// connections now (sans-IO). Never leaves the set empty.
pub fn plan(
    all: &[String],
    removed: &BTreeSet<String>,
    up: &BTreeSet<String>,
) -> (Vec<String>, Vec<String>) {
    let back: Vec<String> = removed
        .iter()
        .filter(|e| up.contains(*e))
        .cloned()
        .collect();
    let mut remaining = all.len() - removed.len() + back.len();
    let mut out = Vec::new();
    for e in all {
        if removed.contains(e) || up.contains(e) {
            continue;
        }
        if remaining <= 1 {
            break;
        }
        remaining -= 1;
        out.push(e.clone());
    }
    (out, back)
}

async fn accepts(url: &str) -> bool {
    matches!(
        tokio::time::timeout(
            CONNECT_TIMEOUT,
            tokio::net::TcpStream::connect(authority(url))
        )
        .await,
        Ok(Ok(_))
    )
}

/// One round: checks every endpoint and updates the client's set and `removed`.
async fn round(client: &Client, all: &[String], removed: &mut BTreeSet<String>) {
    let mut checks = tokio::task::JoinSet::new();
    for e in all.iter().cloned() {
        checks.spawn(async move {
            let ok = accepts(&e).await;
            (e, ok)
        });
    }
    let mut up = BTreeSet::new();
    while let Some(done) = checks.join_next().await {
        if let Ok((e, true)) = done {
            up.insert(e);
        }
    }
    let (out, back) = plan(all, removed, &up);
    for e in out {
        if client.remove_endpoint(&e).await.is_ok() {
            tracing::warn!(endpoint = %e, "etcd member refuses connections; sending requests to the others");
            removed.insert(e);
        }
    }
    for e in back {
        if client.add_endpoint(&e).await.is_ok() {
            tracing::info!(endpoint = %e, "etcd member accepts connections again");
            removed.remove(&e);
        }
    }
}

/// Checks the endpoints once now (so a command's first request avoids a dead member), then
/// every [`INTERVAL`] in the background until `alive` is dropped (the owning store is gone).
pub async fn watch(client: Client, all: Vec<String>, alive: Weak<()>) {
    if all.len() < 2 {
        return;
    }
    let mut removed = BTreeSet::new();
    round(&client, &all, &mut removed).await;
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(INTERVAL).await;
            if alive.upgrade().is_none() {
                return;
            }
            round(&client, &all, &mut removed).await;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(v: &[&str]) -> BTreeSet<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn authorities_of_urls() {
        assert_eq!(authority("http://127.0.0.1:2379"), "127.0.0.1:2379");
        assert_eq!(authority("https://etcd-1:2379/"), "etcd-1:2379");
        assert_eq!(authority("10.0.0.1:2379"), "10.0.0.1:2379");
    }

    #[test]
    fn a_dead_member_goes_out_and_comes_back() {
        let all: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
        let (out, back) = plan(&all, &BTreeSet::new(), &set(&["a", "c"]));
        assert_eq!((out, back), (vec!["b".to_string()], vec![]));
        let (out, back) = plan(&all, &set(&["b"]), &set(&["a", "b", "c"]));
        assert_eq!((out, back), (vec![], vec!["b".to_string()]));
        // Still down: nothing to do.
        let (out, back) = plan(&all, &set(&["b"]), &set(&["a", "c"]));
        assert!(out.is_empty() && back.is_empty());
    }

    #[test]
    fn the_last_endpoint_stays() {
        let all: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
        let (out, back) = plan(&all, &BTreeSet::new(), &BTreeSet::new());
        assert_eq!(out.len(), 2);
        assert!(back.is_empty());
        let (out, _) = plan(&all, &set(&["a", "b"]), &BTreeSet::new());
        assert!(out.is_empty());
    }
}
