//! `postern-outlet`: runs next to a private service, dials out to the relay and forwards the
//! streams of authorised inlets to the service. Parses the command line and calls the library
//! ([`postern_outlet::app::run`] for `run`, [`postern_outlet::cli`] for the admin commands).

use clap::Parser;
use postern_net::runtime::logging::effective_filter;
use postern_outlet::cli::{self, Cli, Command};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let command = match cli.command {
        Command::Run(args) => {
            // The config names the audit log, so it is read before logging starts.
            let mut cfg = args.resolve()?;
            let filter = effective_filter(cli.log.clone(), cfg.log_level.take());
            postern_net::runtime::logging::init(&filter, cfg.audit_log.as_deref())?;
            cfg.log_level = Some(filter);
            // Cancelled at SIGTERM/SIGINT: the outlet drains its streams.
            let shutdown = CancellationToken::new();
            let signal = shutdown.clone();
            tokio::spawn(async move {
                postern_net::runtime::signal::shutdown_signal().await;
                tracing::info!("shutdown asked for: draining");
                signal.cancel();
            });
            // SIGHUP reads the same command line and config file again.
            let reread: postern_outlet::app::Reread = Box::new(|| {
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
            return postern_outlet::app::run_with_reload(cfg, shutdown, Some(reread)).await;
        }
        other => other,
    };
    postern_net::runtime::logging::init(&effective_filter(cli.log, None), None)?;
    match command {
        Command::Run(_) => Ok(()),
        Command::Enroll {
            ticket,
            name,
            state_dir,
        } => postern_net::node_config::enroll_command("outlet", &ticket, name, &state_dir).await,
        Command::Lease { state_dir, command } => cli::lease(state_dir, command).await,
        Command::Access { state_dir, command } => cli::access(state_dir, command).await,
    }
}
