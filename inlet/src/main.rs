//! `postern-inlet`: local ports that reach remote services through the relay. Parses the
//! command line and calls the library ([`postern_inlet::app::run`] for `run`).

use clap::Parser;
use postern_inlet::cli::{CaCommand, Cli, Command};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    postern_net::runtime::logging::init(&cli.log, None)?;
    match cli.command {
        Command::Run(args) => {
            let cfg = args.resolve()?;
            let shutdown = CancellationToken::new();
            let signal = shutdown.clone();
            tokio::spawn(async move {
                postern_net::runtime::signal::shutdown_signal().await;
                tracing::info!("shutdown asked for: draining");
                signal.cancel();
            });
            // SIGHUP reads the same command line and config file again.
            let reread: postern_inlet::app::Reread = Box::new(|| match Cli::try_parse()?.command {
                Command::Run(args) => args.resolve(),
                _ => anyhow::bail!("the command line no longer says `run`"),
            });
            postern_inlet::app::run_with_reload(cfg, shutdown, Some(reread)).await
        }
        Command::Enroll {
            ticket,
            name,
            state_dir,
        } => postern_net::node_config::enroll_command("inlet", &ticket, name, &state_dir).await,
        Command::Lease { state_dir, command } => {
            postern_inlet::cli::lease(state_dir, command).await
        }
        Command::Ca(CaCommand::Export { state_dir }) => {
            print!("{}", postern_inlet::tls::export_ca(&state_dir)?);
            Ok(())
        }
    }
}
