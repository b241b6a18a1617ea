//! The outlet's command line: the arguments of every subcommand, and the admin subcommands
//! (`lease`, `access`) that talk to a running outlet through its admin sockets. `run` is
//! [`crate::app::run`]; `main.rs` only parses and dispatches.

use crate::config::RunArgs;
use crate::lease::admin as lease_admin;
use crate::public::admin as access_admin;
use anyhow::Context;
use clap::{Parser, Subcommand};
use postern_proto::name::NodeName;
use std::path::PathBuf;

/// The postern outlet: registers services with a relay and forwards inlets' end-to-end
/// encrypted streams to them. No inbound port is opened. With an `[influxdb-outlet]` section it
/// also gives every inlet its own short-lived InfluxDB credential.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
pub struct Cli {
    /// Log filter (tracing EnvFilter syntax), e.g. `info` or `postern=debug`
    /// [default: the config file's `log-level` (which a reload puts in force again), else
    /// $POSTERN_LOG, else info].
    #[arg(long, global = true)]
    pub log: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

// Parsed once at start-up: the size difference between variants costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the outlet.
    Run(RunArgs),
    /// Enroll with a ticket from `postern-relay ticket create`: makes this node's key pair
    /// (the private key never leaves this machine) and gets its certificate.
    /// A state directory that is already enrolled is refused (saying as whom) and the ticket
    /// is not used: move the directory away first to enroll again.
    Enroll {
        /// The ticket string.
        ticket: String,
        /// Name to ask for [default: outlet-<hostname>]; a ticket may fix it.
        #[arg(long)]
        name: Option<String>,
        /// State directory to keep the identity in.
        #[arg(long, default_value_os_t = postern_net::runtime::files::default_state_dir("outlet"))]
        state_dir: std::path::PathBuf,
    },
    /// Manage leased InfluxDB credentials of the running outlet (through its admin socket).
    Lease {
        /// The running outlet's state directory.
        #[arg(long, default_value_os_t = postern_net::runtime::files::default_state_dir("outlet"), global = true)]
        state_dir: PathBuf,
        #[command(subcommand)]
        command: LeaseCommand,
    },
    /// Manage access links to the services offered at the relay's public hostname (through the
    /// running outlet's admin socket).
    Access {
        /// The running outlet's state directory.
        #[arg(long, default_value_os_t = postern_net::runtime::files::default_state_dir("outlet"), global = true)]
        state_dir: PathBuf,
        #[command(subcommand)]
        command: AccessCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum AccessCommand {
    /// Make a time-limited access grant and print its link
    /// (`https://<service>.<public-domain>/_postern/access?grant=...`): opening it lets that
    /// browser in until the grant expires or is revoked.
    Create {
        /// The public service the link opens.
        #[arg(long)]
        service: postern_proto::name::ServiceName,
        /// How long the grant lasts, e.g. `30m`, `1h`.
        #[arg(long, default_value = "1h", value_parser = postern_net::runtime::duration::parse_duration)]
        ttl: std::time::Duration,
        /// A label recorded with the grant and in the audit log, `KEY=VALUE` (repeatable),
        /// e.g. `team=ops`.
        #[arg(long = "attr", value_name = "KEY=VALUE")]
        attrs: Vec<String>,
    },
    /// List grants (no secrets).
    List,
    /// Revoke a grant now: its browsers are refused from their next request on.
    Revoke {
        /// The grant's id, as `access list` shows it.
        id: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum LeaseCommand {
    /// Create a lease for CLIENT by hand and print its credential and expiry.
    Create {
        /// The client identity the lease is for (appears in the backend's description).
        client: NodeName,
        /// An attribute of the client, `KEY=VALUE` (repeatable): with
        /// `[[influxdb-outlet.profile]]` tables they choose the lease's profile, as the
        /// attributes in a client's certificate do.
        #[arg(long = "attr", value_name = "KEY=VALUE")]
        attrs: Vec<String>,
    },
    /// List leases, with each one's profile.
    List,
    /// Show one lease, with its profile.
    Show { lease_id: String },
    /// Revoke one lease now.
    Revoke { lease_id: String },
}

/// `postern-outlet access …`: one request to the running outlet's access admin socket; the
/// answer is printed, and an error answer exits with status 1.
pub async fn access(state_dir: PathBuf, command: AccessCommand) -> anyhow::Result<()> {
    let request = match command {
        AccessCommand::Create {
            service,
            ttl,
            attrs,
        } => {
            let attrs = parse_attrs(&attrs)?;
            access_admin::Request::Create {
                service,
                ttl_ms: ttl.as_millis() as u64,
                attrs,
            }
        }
        AccessCommand::List => access_admin::Request::List,
        AccessCommand::Revoke { id } => access_admin::Request::Revoke { id },
    };
    let path = access_admin::socket_path(&state_dir);
    let response = access_admin::client_request(&path, &request)
        .await
        .with_context(|| {
            format!(
                "is the outlet running with --state-dir {} and a public service?",
                state_dir.display()
            )
        })?;
    print!("{}", response.to_text());
    if let access_admin::Response::Error { .. } = response {
        std::process::exit(1);
    }
    Ok(())
}

/// `--attr KEY=VALUE` flags as a map.
fn parse_attrs(attrs: &[String]) -> anyhow::Result<std::collections::BTreeMap<String, String>> {
    attrs
        .iter()
        .map(|a| {
            a.split_once('=')
                .filter(|(k, _)| !k.is_empty())
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .with_context(|| format!("--attr {a:?}: expected KEY=VALUE"))
        })
        .collect()
}

/// `postern-outlet lease …`: one request to the running outlet's lease admin socket; the
/// answer is printed, and an error answer exits with status 1.
pub async fn lease(state_dir: PathBuf, command: LeaseCommand) -> anyhow::Result<()> {
    let request = match command {
        LeaseCommand::Create { client, attrs } => lease_admin::Request::Create {
            client,
            attrs: parse_attrs(&attrs)?,
        },
        LeaseCommand::List => lease_admin::Request::List,
        LeaseCommand::Show { lease_id } => lease_admin::Request::Show { lease_id },
        LeaseCommand::Revoke { lease_id } => lease_admin::Request::Revoke { lease_id },
    };
    let path = lease_admin::socket_path(&state_dir);
    let response = lease_admin::client_request(&path, &request)
        .await
        .with_context(|| {
            format!(
                "is the outlet running with --state-dir {}?",
                state_dir.display()
            )
        })?;
    print!("{}", response.to_text());
    if let lease_admin::Response::Error { .. } = response {
        std::process::exit(1);
    }
    Ok(())
}
