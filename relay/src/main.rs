//! `postern-relay`: the public rendezvous and packet forwarder.

use anyhow::Context;
use clap::{Parser, Subcommand};
use postern_proto::name::NodeName;
use postern_proto::tls;
use postern_relay::config::RunArgs;
use postern_relay::state::StateDir;
use postern_relay::{Relay, RelayOptions};
use std::path::PathBuf;
use tokio_util::sync::CancellationToken;

/// The postern relay: nodes dial out to it, it pairs inlets with outlets and forwards their
/// end-to-end encrypted QUIC packets without being able to read them.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    /// Log filter (tracing EnvFilter syntax), e.g. `info` or `postern=debug`.
    #[arg(long, global = true, env = "POSTERN_LOG", default_value = "info")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the relay.
    Run(RunArgs),
    /// Manage the project certificate authority.
    #[command(subcommand)]
    Ca(CaCommand),
}

#[derive(Debug, Subcommand)]
enum CaCommand {
    /// Create the project CA and the relay's own certificate in the state directory.
    Init {
        /// State directory to create them in.
        #[arg(long, default_value = postern_relay::config::DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
        /// Name written into the relay's certificate; nodes check it (`relay-name`).
        #[arg(long, default_value = "relay")]
        name: NodeName,
        /// Project name shown in the CA certificate.
        #[arg(long, default_value = "postern")]
        project: String,
        /// Replace an existing CA (every issued certificate stops working).
        #[arg(long)]
        force: bool,
    },
    /// Issue a certificate for a node (outlet or inlet) named NAME.
    Issue {
        /// The node's name (lowercase letters, digits, '-', '.').
        name: NodeName,
        /// State directory holding the CA.
        #[arg(long, default_value = postern_relay::config::DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
        /// Where to write NAME.pem, NAME.key and ca.pem.
        #[arg(long, default_value = ".")]
        out_dir: PathBuf,
    },
    /// Print the CA certificate's SHA-256 fingerprint.
    Fingerprint {
        #[arg(long, default_value = postern_relay::config::DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&cli.log).context("--log")?)
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::Run(args) => run(args).await,
        Command::Ca(CaCommand::Init {
            state_dir,
            name,
            project,
            force,
        }) => {
            let dir = StateDir::new(state_dir);
            let ca = dir.init_ca(&project, &name, force)?;
            println!("created project CA in {}", dir.root().display());
            println!("CA fingerprint: {}", ca.fingerprint());
            println!("relay certificate: {}", dir.relay_cert().display());
            Ok(())
        }
        Command::Ca(CaCommand::Issue {
            name,
            state_dir,
            out_dir,
        }) => {
            let (cert, key) = StateDir::new(state_dir).issue(&name, &out_dir)?;
            println!("certificate: {}", cert.display());
            println!("private key: {}", key.display());
            Ok(())
        }
        Command::Ca(CaCommand::Fingerprint { state_dir }) => {
            println!("{}", StateDir::new(state_dir).load_ca()?.fingerprint());
            Ok(())
        }
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let cfg = args.resolve()?;
    let state = StateDir::new(&cfg.state_dir);
    let cert = postern_net::files::read(&cfg.cert)?;
    let key = postern_net::files::read(&cfg.key)?;
    let identity = tls::Identity::from_pem(&cert, &key)
        .with_context(|| format!("relay certificate {}", cfg.cert.display()))?;
    let roots = tls::roots_from_pem(&postern_net::files::read(&cfg.ca)?)
        .with_context(|| format!("CA certificate {}", cfg.ca.display()))?;
    let relay = Relay::bind(RelayOptions {
        listen: cfg.listen,
        identity,
        roots,
        reset_key: Some(state.reset_key()?),
        tap: None,
    })?;
    let shutdown = CancellationToken::new();
    let signal = shutdown.clone();
    tokio::spawn(async move {
        postern_net::shutdown_signal().await;
        signal.cancel();
    });
    relay.run(shutdown).await;
    Ok(())
}
