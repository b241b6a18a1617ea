//! `postern-outlet`: runs next to a private service, dials out to the relay and forwards the
//! streams of authorised inlets to the service.

use anyhow::Context;
use clap::{Parser, Subcommand};
use postern_outlet::config::{targets, RunArgs};
use postern_outlet::{Outlet, OutletOptions};
use tokio_util::sync::CancellationToken;

/// The postern outlet: registers services with a relay and forwards inlets' end-to-end
/// encrypted streams to them. No inbound port is opened.
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
    /// Run the outlet.
    Run(RunArgs),
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
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let cfg = args.resolve()?;
    let (relay, identity, roots) = cfg.node.load()?;
    let outlet = Outlet::bind(OutletOptions {
        relay,
        identity,
        roots,
        services: targets(&cfg.services)?,
    })?;
    let shutdown = CancellationToken::new();
    let signal = shutdown.clone();
    tokio::spawn(async move {
        postern_net::shutdown_signal().await;
        signal.cancel();
    });
    outlet.run(shutdown).await;
    Ok(())
}
