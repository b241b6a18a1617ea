//! The inlet's command line: `run`, `enroll`, `ca export` and `lease`, with their flags (`run`'s are
//! [`RunArgs`], shared with the config file's merge).

use crate::config::RunArgs;
use clap::{Parser, Subcommand};

/// The postern inlet: opens a local port per service; every client connection to it becomes a
/// stream of one end-to-end encrypted QUIC connection to the service's outlet.
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
    /// Run the inlet.
    Run(RunArgs),
    /// Enroll with a ticket from `postern-relay ticket create`: makes this node's key pair
    /// (the private key never leaves this machine) and gets its certificate.
    /// A state directory that is already enrolled is refused (saying as whom) and the ticket
    /// is not used: move the directory away first to enroll again.
    Enroll {
        /// The ticket string.
        ticket: String,
        /// Name to ask for [default: inlet-<hostname>]; a ticket may fix it.
        #[arg(long)]
        name: Option<String>,
        /// State directory to keep the identity in.
        #[arg(long, default_value_os_t = postern_net::runtime::files::default_state_dir("inlet"))]
        state_dir: std::path::PathBuf,
    },
    /// The project CA.
    #[command(subcommand)]
    Ca(CaCommand),
    /// This identity's own leased InfluxDB credential, for a client that cannot go through
    /// the inlet's port (a notebook pasting a token): the running inlet asks the service's
    /// outlet over its end-to-end connection and the credential is printed to stdout with its
    /// expiry. Only where the outlet's lease profile for this identity says `hand-out = true`.
    Lease {
        /// The running inlet's state directory (its admin socket is `inlet.sock` there).
        #[arg(long, default_value_os_t = postern_net::runtime::files::default_state_dir("inlet"), global = true)]
        state_dir: std::path::PathBuf,
        #[command(subcommand)]
        command: LeaseCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum LeaseCommand {
    /// Get a new lease of this identity and print its credential and expiry. It is not renewed:
    /// it lasts the profile's `leased-token-expires-in`, and `postern-outlet lease revoke`
    /// ends it sooner.
    Create {
        /// The service [default: the inlet's only `kind = "influxdb"` service, or its only
        /// service].
        #[arg(long)]
        service: Option<postern_proto::name::ServiceName>,
    },
    /// Print the lease last handed out to this identity again, while it is live.
    Show {
        /// The service [default: the inlet's only `kind = "influxdb"` service, or its only
        /// service].
        #[arg(long)]
        service: Option<postern_proto::name::ServiceName>,
    },
}

/// `postern-inlet lease …`: one request to the running inlet's admin socket. The credential
/// goes to stdout only; an error goes to stderr and exits with status 1.
pub async fn lease(state_dir: std::path::PathBuf, command: LeaseCommand) -> anyhow::Result<()> {
    use crate::admin;
    let (service, fresh) = match command {
        LeaseCommand::Create { service } => (service, true),
        LeaseCommand::Show { service } => (service, false),
    };
    let path = admin::socket_path(&state_dir);
    let response = admin::client_request(&path, &admin::Request::Lease { service, fresh })
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "{e}; is the inlet running with --state-dir {}?",
                state_dir.display()
            )
        })?;
    match &response {
        admin::Response::Lease { .. } => {
            print!("{}", response.to_text());
            Ok(())
        }
        admin::Response::Error { message } => {
            eprintln!("error: {message}");
            std::process::exit(1);
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Print the project CA certificate (PEM) this inlet enrolled with, to trust it once, e.g.
    /// in a browser for a TLS listener whose certificate the project CA issued:
    /// `postern-inlet ca export > ca.pem`, then
    /// `certutil -d sql:$HOME/.pki/nssdb -A -t "C,," -n postern-ca -i ca.pem`.
    Export {
        /// The inlet's state directory.
        #[arg(long, default_value_os_t = postern_net::runtime::files::default_state_dir("inlet"))]
        state_dir: std::path::PathBuf,
    },
}
