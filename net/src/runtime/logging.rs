//! Process logging for the binaries: human-readable logs on stderr, and optionally the audit
//! log, a file of JSON lines holding only the `postern::audit` events.
//!
//! Audit events are ordinary tracing events with `target: "postern::audit"` (enrollments, policy
//! decisions, leases, revocations). The audit layer has its own filter, so `--log` never hides
//! them from the file. Their fields are chosen where they are emitted to carry identities,
//! services, rules and ids, never a secret; spans are left out of the file for the same reason.

use std::fs::OpenOptions;
use std::path::Path;
use std::sync::{Mutex, OnceLock};
use tracing_subscriber::filter::{EnvFilter, LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, Layer, Registry};

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
    #[error("log level {filter:?}: {directive:?} is neither a level (trace, debug, info, warn, error, off) nor TARGET=LEVEL")]
    NotALevel { filter: String, directive: String },
    #[error("logging was already set up: {0}")]
    Init(String),
    #[error("cannot change the log filter: {0}")]
    Reload(String),
}

/// The stderr filter in force, swapped by [`set_filter`] (a config reload).
static STDERR_FILTER: OnceLock<reload::Handle<EnvFilter, Registry>> = OnceLock::new();

/// Parses a log filter (tracing `EnvFilter` syntax: `info`, `warn,postern_relay=debug`).
///
/// A bare word that is not a level is refused, although `EnvFilter` would take it as a target
/// to log at every level: in a config file `log-level = "verbose"` is a typo, and taking it
/// would silently turn logging off everywhere else.
pub fn parse_filter(filter: &str) -> Result<EnvFilter, LoggingError> {
    const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];
    for directive in filter.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        if !directive.contains('=') && !LEVELS.iter().any(|l| directive.eq_ignore_ascii_case(l)) {
            return Err(LoggingError::NotALevel {
                filter: filter.to_owned(),
                directive: directive.to_owned(),
            });
        }
    }
    EnvFilter::try_new(filter).map_err(|source| LoggingError::Filter {
        filter: filter.to_owned(),
        source,
    })
}

/// The stderr filter a binary uses: `--log`, else its config file's `log-level` (which a
/// reload puts in force again), else `$POSTERN_LOG`, else `info`. The file comes before the
/// variable so that editing it and reloading works under a service manager that sets the
/// variable.
pub fn effective_filter(flag: Option<String>, file: Option<String>) -> String {
    flag.or(file)
        .or_else(|| {
            std::env::var("POSTERN_LOG")
                .ok()
                .filter(|v| !v.trim().is_empty())
        })
        .unwrap_or_else(|| "info".to_owned())
}

/// Puts `filter` in force for the stderr log from now on (a reload); the audit log is not
/// affected. An invalid filter changes nothing. Returns false when logging was not set up by
/// [`init`] (nothing to change).
pub fn set_filter(filter: &str) -> Result<bool, LoggingError> {
    let env = parse_filter(filter)?;
    let Some(handle) = STDERR_FILTER.get() else {
        return Ok(false);
    };
    handle
        .reload(env)
        .map_err(|e| LoggingError::Reload(e.to_string()))?;
    Ok(true)
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
/// audit log when `audit_log` is given. The stderr filter can be changed later with
/// [`set_filter`].
pub fn init(filter: &str, audit_log: Option<&Path>) -> Result<(), LoggingError> {
    let (env, handle) = reload::Layer::new(parse_filter(filter)?);
    let stderr = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_filter(env);
    let audit = audit_log.map(audit_layer).transpose()?;
    tracing_subscriber::registry()
        .with(stderr)
        .with(audit)
        .try_init()
        .map_err(|e| LoggingError::Init(e.to_string()))?;
    // Only the first set-up reaches here (`try_init` refuses a second one).
    let _ = STDERR_FILTER.set(handle);
    Ok(())
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
    fn log_filters_are_levels_or_target_directives() {
        for ok in [
            "info",
            "DEBUG",
            "warn,postern_relay=debug",
            "off",
            "postern=trace,info",
        ] {
            assert!(parse_filter(ok).is_ok(), "{ok}");
        }
        for bad in ["verbose", "info,loud", "postern=loud"] {
            assert!(parse_filter(bad).is_err(), "{bad}");
        }
        let e = parse_filter("verbose")
            .expect_err("not a level")
            .to_string();
        assert!(e.contains("verbose") && e.contains("debug"), "{e}");
    }

    #[test]
    fn a_reloaded_filter_takes_effect() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("log");
        let file = std::fs::File::create(&path).expect("create");
        let (filter, handle) = reload::Layer::new(parse_filter("info").expect("info"));
        let layer = tracing_subscriber::fmt::layer()
            .with_ansi(false)
            .with_writer(Mutex::new(file))
            .with_filter(filter);
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(subscriber, || {
            tracing::debug!("hidden before");
            handle
                .reload(parse_filter("debug").expect("debug"))
                .expect("reload");
            tracing::debug!("shown after");
        });
        let text = std::fs::read_to_string(&path).expect("read");
        assert!(!text.contains("hidden before"), "{text}");
        assert!(text.contains("shown after"), "{text}");
    }

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
