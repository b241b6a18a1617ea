//! `postern-inlet`: local ports that reach remote services through the relay. Parses the
//! command line and calls the library ([`postern_inlet::app::run`] for `run`).

use clap::Parser;
use postern_inlet::cli::{CaCommand, Cli, Command};
use postern_net::runtime::logging::effective_filter;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => {
            // The config names the log level, so it is read before logging starts.
            let mut cfg = args.resolve()?;
            let filter = effective_filter(cli.log.clone(), cfg.log_level.take());
            postern_net::runtime::logging::init(&filter, None)?;
            cfg.log_level = Some(filter);
            let shutdown = CancellationToken::new();
            let signal = shutdown.clone();
            tokio::spawn(async move {
                postern_net::runtime::signal::shutdown_signal().await;
                tracing::info!("shutdown asked for: draining");
                signal.cancel();
            });
            // SIGHUP reads the same command line and config file again.
            let reread: postern_inlet::app::Reread = Box::new(|| {
                let cli = Cli::try_parse()?;
                match cli.command {
                    Command::Run(args) => {
                        let mut cfg = args.resolve()?;
                        cfg.log_level = Some(effective_filter(cli.log, cfg.log_level.take()));
                        Ok(cfg)
                    }
                    _ => anyhow::bail!("the command line no longer says `run`"),
                }
            });
            postern_inlet::app::run_with_reload(cfg, shutdown, Some(reread)).await
        }
        other => {
            postern_net::runtime::logging::init(&effective_filter(cli.log, None), None)?;
            execute(other).await
        }
    }
}

/// The commands other than `run`.
async fn execute(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Run(_) => Ok(()),
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
