//! Process logging for the binaries: human-readable logs on stderr, and optionally the audit
//! log, a file of JSON lines holding only the `postern::audit` events.
//!
//! Audit events are ordinary tracing events with `target: "postern::audit"` (enrollments, policy
//! decisions, leases, revocations). The audit layer has its own filter, so `--log` never hides
//! them from the file. Their fields are chosen where they are emitted to carry identities,
//! services, rules and ids, never a secret; spans are left out of the file for the same reason.

use std::fs::OpenOptions;
use std::path::Path;
use std::sync::Mutex;
use tracing_subscriber::filter::{EnvFilter, LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

/// The tracing target of audit events.
pub const AUDIT_TARGET: &str = "postern::audit";

/// Why logging could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoggingError {
    #[error("--log {filter:?}: {source}")]
    Filter {
        filter: String,
        source: tracing_subscriber::filter::ParseError,
    },
    #[error("cannot open the audit log {path}: {source}")]
    AuditLog {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("logging was already set up: {0}")]
    Init(String),
}

/// A tracing layer writing audit events as JSON lines to `path` (appended, created `0600`).
pub fn audit_layer<S>(path: &Path) -> Result<impl Layer<S> + Send + Sync + 'static, LoggingError>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    let mut open = OpenOptions::new();
    open.create(true).append(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        open.mode(0o600);
    }
    let file = open.open(path).map_err(|source| LoggingError::AuditLog {
        path: path.to_owned(),
        source,
    })?;
    // One `write` per event on an unbuffered file: each line is whole as soon as it is logged.
    let layer = tracing_subscriber::fmt::layer()
        .json()
        .flatten_event(true)
        .with_current_span(false)
        .with_span_list(false)
        .with_target(true)
        .with_writer(Mutex::new(file))
        .with_filter(Targets::new().with_target(AUDIT_TARGET, LevelFilter::INFO));
    Ok(layer)
}

/// Sets up the process's logging: `filter` (tracing `EnvFilter` syntax) for stderr, plus the
/// audit log when `audit_log` is given.
pub fn init(filter: &str, audit_log: Option<&Path>) -> Result<(), LoggingError> {
    let env = EnvFilter::try_new(filter).map_err(|source| LoggingError::Filter {
        filter: filter.to_owned(),
        source,
    })?;
    let stderr = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_filter(env);
    let audit = audit_log.map(audit_layer).transpose()?;
    tracing_subscriber::registry()
        .with(stderr)
        .with(audit)
        .try_init()
        .map_err(|e| LoggingError::Init(e.to_string()))
}

/// A bound socket's address for a log line: `127.0.0.1:4434`, or `unknown` when the socket
/// cannot tell (never `Some(…)` / `Ok(…)`).
pub fn local_addr(addr: std::io::Result<std::net::SocketAddr>) -> String {
    addr.map(|a| a.to_string())
        .unwrap_or_else(|_| "unknown".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audit_layer_writes_only_audit_events_as_json_lines() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.jsonl");
        let subscriber = tracing_subscriber::registry().with(audit_layer(&path).expect("layer"));
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("node", remote = "10.0.0.1:1");
            let _g = span.enter();
            tracing::info!(target: "postern::audit", event = "policy", action = "route", node = "inlet-1", allowed = true, rule = "role = \"x\"");
            tracing::info!(secret = "hunter2", "an ordinary log line");
            tracing::debug!(target: "postern::audit", event = "too-verbose");
        });
        let text = std::fs::read_to_string(&path).expect("read");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 1, "{text}");
        let v: serde_json::Value = serde_json::from_str(lines[0]).expect("json");
        assert_eq!(v["target"], "postern::audit");
        assert_eq!(v["event"], "policy");
        assert_eq!(v["allowed"], true);
        assert_eq!(v["rule"], "role = \"x\"");
        assert!(v.get("span").is_none(), "{v}");
        assert!(!text.contains("hunter2"));
    }
}
