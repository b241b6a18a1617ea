//! The inlet's command line: `run`, `enroll` and `ca export`, with their flags (`run`'s are
//! [`RunArgs`], shared with the config file's merge).

use crate::config::RunArgs;
use clap::{Parser, Subcommand};

/// The postern inlet: opens a local port per service; every client connection to it becomes a
/// stream of one end-to-end encrypted QUIC connection to the service's outlet.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
pub struct Cli {
    /// Log filter (tracing EnvFilter syntax), e.g. `info` or `postern=debug`.
    #[arg(long, global = true, env = "POSTERN_LOG", default_value = "info")]
    pub log: String,
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
