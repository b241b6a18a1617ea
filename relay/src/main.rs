//! `postern-relay`: the public rendezvous and packet forwarder. Parses the command line and
//! hands it to [`postern_relay::cli`].

use clap::Parser;
use postern_relay::cli::Cli;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    Cli::parse().run().await
}
