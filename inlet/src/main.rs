//! `postern-inlet`: local ports that reach remote services through the relay.

use clap::{Parser, Subcommand};
use postern_inlet::config::RunArgs;
use postern_inlet::{Inlet, InletOptions, InletService};
use tokio_util::sync::CancellationToken;

/// The postern inlet: opens a local port per service; every client connection to it becomes a
/// stream of one end-to-end encrypted QUIC connection to the service's outlet.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    /// Log filter (tracing EnvFilter syntax), e.g. `info` or `postern=debug`.
    #[arg(long, global = true, env = "POSTERN_LOG", default_value = "info")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

// Parsed once at start-up: the size difference between variants costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum Command {
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
        #[arg(long, default_value = "postern-inlet-state")]
        state_dir: std::path::PathBuf,
    },
    /// The project CA.
    #[command(subcommand)]
    Ca(CaCommand),
}

#[derive(Debug, Subcommand)]
enum CaCommand {
    /// Print the project CA certificate (PEM) this inlet enrolled with, to trust it once, e.g.
    /// in a browser for a TLS listener whose certificate the project CA issued:
    /// `postern-inlet ca export > ca.pem`, then
    /// `certutil -d sql:$HOME/.pki/nssdb -A -t "C,," -n postern-ca -i ca.pem`.
    Export {
        /// The inlet's state directory.
        #[arg(long, default_value = "postern-inlet-state")]
        state_dir: std::path::PathBuf,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    postern_net::runtime::logging::init(&cli.log, None)?;
    match cli.command {
        Command::Run(args) => run(args).await,
        Command::Enroll {
            ticket,
            name,
            state_dir,
        } => postern_net::node_config::enroll_command("inlet", &ticket, name, &state_dir).await,
        Command::Ca(CaCommand::Export { state_dir }) => {
            print!("{}", postern_inlet::tls::export_ca(&state_dir)?);
            Ok(())
        }
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let cfg = args.resolve()?;
    let recorder = match cfg.metrics_addr {
        Some(_) => {
            let r = postern_net::runtime::ops::recorder().map_err(anyhow::Error::msg)?;
            postern_inlet::metrics::describe();
            Some(r)
        }
        None => None,
    };
    // Held until the process ends: a second inlet on this identity is refused here.
    let _lock = postern_net::runtime::state_lock::lock(&cfg.state_dir, "inlet")?;
    let settings =
        postern_net::node_config::prepare(cfg.node.clone(), &cfg.state_dir, "inlet").await?;
    let (relay, identity, roots) = settings.load()?;
    let mut inlet = Inlet::bind(InletOptions {
        relay,
        identity,
        roots,
        services: cfg
            .services
            .iter()
            .map(|s| InletService {
                name: s.name.clone(),
                listen: s.listen,
                kind: s.kind,
            })
            .collect(),
    })
    .await?;
    for s in &cfg.services {
        if let Some((cert, key)) = s.tls_files()? {
            inlet.set_tls(&s.name, postern_inlet::tls::acceptor(cert, key)?);
        }
    }
    inlet.set_drain_timeout(cfg.drain_timeout);
    if let Some(max) = cfg.max_connections {
        inlet.set_max_connections(max);
    }
    inlet.set_transport(cfg.transport.clone());
    // Relays given in the config, else the other relays the enrollment ticket named.
    let more_relays = if cfg.more_relays.is_empty() {
        &settings.more_relays
    } else {
        &cfg.more_relays
    };
    for relay in
        postern_net::transport::relay_path::resolve_relays(more_relays, &settings.relay_name)
            .map_err(anyhow::Error::msg)?
    {
        inlet.add_relay(relay);
    }
    let ops_stop = CancellationToken::new();
    if let Some(addr) = cfg.metrics_addr {
        let listener = postern_net::runtime::ops::bind(addr).await?;
        tokio::spawn(postern_net::runtime::ops::serve(
            listener,
            std::sync::Arc::new(inlet.handle()),
            recorder,
            ops_stop.clone(),
        ));
    }
    let shutdown = CancellationToken::new();
    let signal = shutdown.clone();
    tokio::spawn(async move {
        postern_net::runtime::signal::shutdown_signal().await;
        tracing::info!("shutdown asked for: draining");
        signal.cancel();
    });
    let handle = inlet.handle();
    postern_net::control::renew::spawn_if_enrolled(
        &cfg.state_dir,
        &settings.cert,
        handle.control(),
        move |identity| {
            if let Err(e) = handle.set_identity(&identity) {
                tracing::error!(error = %e, "cannot use the renewed certificate");
            }
        },
        shutdown.clone(),
    );
    inlet.run(shutdown).await;
    ops_stop.cancel();
    tracing::info!("inlet stopped");
    Ok(())
}
