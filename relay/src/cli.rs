//! The `postern-relay` command line: its clap types, and the code of every subcommand but
//! `run`, which starts the relay through [`crate::app::run`]. `main.rs` only parses and calls
//! [`Cli::run`].

use crate::authority::{Authority, TicketSpec};
use crate::config::{RunArgs, DEFAULT_STATE_DIR};
use crate::fleet::{ClusterArgs, FleetState};
use crate::state::StateDir;
use anyhow::Context;
use clap::{Parser, Subcommand};
use postern_net::runtime::duration::parse_duration;
use postern_proto::name::NodeName;
use std::path::PathBuf;
use tokio_util::sync::CancellationToken;

/// The postern relay: nodes dial out to it, it pairs inlets with outlets and forwards their
/// end-to-end encrypted QUIC packets without being able to read them.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
pub struct Cli {
    /// Log filter (tracing EnvFilter syntax), e.g. `info` or `warn,postern_relay=debug`
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
    /// Run the relay.
    Run(RunArgs),
    /// Enrollment tickets (single-use, time-limited invitations for new nodes).
    #[command(subcommand)]
    Ticket(TicketCommand),
    /// Enrolled identities: list them, revoke one.
    #[command(subcommand)]
    Identity(IdentityCommand),
    /// Manage the project certificate authority.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Show a running relay's nodes, services, routes, tickets and identities, and the fleet's
    /// relays (through its admin API; with `--etcd`, the fleet straight from etcd).
    Status(StatusArgs),
    /// Make a running relay reread its config, as SIGHUP does (through its admin API): its
    /// `[[policy]]` tables and `log-level` are put in force, live routes the new policy
    /// refuses are closed. An invalid config is refused with its error (exit status 1) and
    /// the one in force stays.
    Reload(ReloadArgs),
}

#[derive(Debug, clap::Args)]
pub struct ReloadArgs {
    /// The relay's admin API address (its `--admin-addr`) [default: the config file's
    /// admin-addr, else 127.0.0.1:4434].
    #[arg(long)]
    pub admin_addr: Option<std::net::SocketAddr>,
    /// The relay's config file, to take `admin-addr` and `state-dir` from.
    #[arg(long, env = "POSTERN_RELAY_CONFIG")]
    pub config: Option<PathBuf>,
    /// The relay's state directory, holding `admin.token` [default: the config file's
    /// state-dir, else ./postern-relay-state].
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Read the admin token from this file instead of `<state-dir>/admin.token`.
    #[arg(long)]
    pub admin_token_file: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// The relay's admin API address (its `--admin-addr`) [default: the config file's
    /// admin-addr, else 127.0.0.1:4434].
    #[arg(long)]
    pub admin_addr: Option<std::net::SocketAddr>,
    /// The relay's config file, to take `admin-addr` and `state-dir` from.
    #[arg(long, env = "POSTERN_RELAY_CONFIG")]
    pub config: Option<PathBuf>,
    /// The relay's state directory, holding `admin.token` [default: the config file's
    /// state-dir, else ./postern-relay-state].
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Read the admin token from this file instead of `<state-dir>/admin.token`.
    #[arg(long)]
    pub admin_token_file: Option<PathBuf>,
    /// Print the full state as JSON instead of a summary.
    #[arg(long)]
    pub json: bool,
    /// With `--etcd`, read the fleet (its relays and their load) from etcd itself instead of
    /// asking a relay: works while no relay answers.
    #[command(flatten)]
    pub cluster: ClusterArgs,
}

#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Create the project CA and the relay's own certificate in the state directory.
    Init {
        /// State directory to create them in.
        #[arg(long, default_value = DEFAULT_STATE_DIR)]
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
        #[arg(long, default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
        /// Where to write NAME.pem, NAME.key and ca.pem.
        #[arg(long, default_value = ".")]
        out_dir: PathBuf,
    },
    /// Print the CA certificate's SHA-256 fingerprint.
    Fingerprint {
        #[arg(long, default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum TicketCommand {
    /// Create a ticket and print it; hand it to the node (`postern-outlet enroll TICKET`).
    Create {
        /// Attribute to grant, `KEY=VALUE` (repeatable), e.g. `role=influxdb-client`.
        #[arg(long = "attr", value_name = "KEY=VALUE")]
        attrs: Vec<String>,
        /// How long the ticket can be used, e.g. `10m`, `1h`, `2d`.
        #[arg(long, default_value = "10m")]
        ttl: String,
        /// How many nodes may enroll with it.
        #[arg(long, default_value_t = 1)]
        uses: u32,
        /// Fix the node's name (otherwise the node picks it).
        #[arg(long)]
        name: Option<NodeName>,
        /// Relay address the node will use, `host:port` (repeatable).
        #[arg(long = "relay", required = true)]
        relays: Vec<String>,
        /// Where the node enrolls, `host:port` [default: the first --relay].
        #[arg(long)]
        authority: Option<String>,
        /// Name in the relay's certificate.
        #[arg(long, default_value = "relay")]
        relay_name: String,
        #[arg(long, default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
        #[command(flatten)]
        cluster: ClusterArgs,
    },
    /// List tickets (never their secrets).
    List {
        #[arg(long, default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
        #[command(flatten)]
        cluster: ClusterArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum IdentityCommand {
    /// List enrolled nodes, their attributes and status.
    List {
        #[arg(long, default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
        #[command(flatten)]
        cluster: ClusterArgs,
    },
    /// Revoke a node. When the relay of this state directory runs (its admin API answers with
    /// the directory's admin token), the revocation goes to it: it cuts the node off at once,
    /// records it and says so. Otherwise it is written to the state directory, and a relay
    /// started from it refuses the node. A directory without the project CA is an error.
    Revoke {
        name: NodeName,
        /// The relay's state directory (made by `postern-relay ca init`).
        #[arg(long, default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
        /// The running relay's admin API address (its `--admin-addr`) [default: 127.0.0.1:4434].
        #[arg(long)]
        admin_addr: Option<std::net::SocketAddr>,
        /// With `--etcd`, the revocation is recorded in the fleet's shared state, and every
        /// relay of the fleet cuts the node off within a second.
        #[command(flatten)]
        cluster: ClusterArgs,
    },
}

impl Cli {
    /// Sets up logging and does what the command asks; `run` serves until SIGINT or SIGTERM.
    pub async fn run(self) -> anyhow::Result<()> {
        let command = match self.command {
            Command::Run(args) => {
                let check = args.check;
                // The config names the audit log, so it is read before logging starts.
                let cfg = args.resolve()?;
                if check {
                    println!("{}", check_summary(&cfg));
                    return Ok(());
                }
                let mut cfg = cfg;
                cfg.log_level = Some(log_filter(self.log.clone(), cfg.log_level.take()));
                postern_net::runtime::logging::init(
                    cfg.log_level.as_deref().unwrap_or("info"),
                    cfg.audit_log.as_deref(),
                )?;
                // A reload reads the same command line and config file again (the policy and
                // the log level).
                let reread: crate::app::Reread = Box::new(|| {
                    let cli = Cli::try_parse()?;
                    match cli.command {
                        Command::Run(args) => {
                            let mut cfg = args.resolve()?;
                            cfg.log_level = Some(log_filter(cli.log, cfg.log_level.take()));
                            Ok(cfg)
                        }
                        _ => anyhow::bail!("the command line no longer says `run`"),
                    }
                });
                return crate::app::run_with_reload(cfg, shutdown_on_signal(), Some(reread)).await;
            }
            other => other,
        };
        postern_net::runtime::logging::init(&log_filter(self.log, None), None)?;
        execute(command).await
    }
}

/// The log filter in force: `--log`, else the config file's `log-level`, else `$POSTERN_LOG`,
/// else `info`. The file comes before the variable so that editing it and reloading works
/// under a service manager that sets the variable.
fn log_filter(flag: Option<String>, file: Option<String>) -> String {
    flag.or(file)
        .or_else(|| {
            std::env::var("POSTERN_LOG")
                .ok()
                .filter(|v| !v.trim().is_empty())
        })
        .unwrap_or_else(|| "info".to_owned())
}

/// What `run --check` prints for a configuration that resolves: enough to see that the
/// file meant is the file read (never a credential: the cluster's are references anyway).
fn check_summary(cfg: &crate::config::RelayConfig) -> String {
    let mut out = format!(
        "configuration OK: listen {}, state directory {}",
        cfg.listen,
        cfg.state_dir.display()
    );
    match &cfg.cluster {
        Some(c) => out.push_str(&format!(
            ", fleet state in etcd {:?} under {}{}",
            c.endpoints,
            c.prefix,
            c.name
                .as_deref()
                .map(|n| format!(" as relay {n}"))
                .unwrap_or_default()
        )),
        None => out.push_str(", state kept in the state directory (no cluster)"),
    }
    out
}

/// A token cancelled when the process is asked to stop (SIGINT, SIGTERM).
fn shutdown_on_signal() -> CancellationToken {
    let shutdown = CancellationToken::new();
    let signal = shutdown.clone();
    tokio::spawn(async move {
        postern_net::runtime::signal::shutdown_signal().await;
        tracing::info!("shutdown asked for: draining");
        signal.cancel();
    });
    shutdown
}

/// Does what an offline or admin subcommand asks.
async fn execute(command: Command) -> anyhow::Result<()> {
    match command {
        // `Cli::run` runs the relay itself, with logging set up from its config.
        Command::Run(_) => Ok(()),
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
        Command::Ticket(TicketCommand::Create {
            attrs,
            ttl,
            uses,
            name,
            relays,
            authority,
            relay_name,
            state_dir,
            cluster,
        }) => {
            let attrs = attrs
                .iter()
                .map(|a| postern_proto::policy::parse_attr(a).map_err(anyhow::Error::msg))
                .collect::<anyhow::Result<_>>()?;
            let spec = TicketSpec {
                attrs,
                ttl: parse_duration(&ttl).map_err(anyhow::Error::msg)?,
                uses,
                name,
                relays,
                authority,
                relay_name,
            };
            let ticket = match etcd(cluster, &state_dir).await? {
                Some(fleet) => fleet.create_ticket(spec).await?,
                None => Authority::new(StateDir::new(state_dir)).create_ticket(spec)?,
            };
            println!("{}", ticket.encode());
            Ok(())
        }
        Command::Ticket(TicketCommand::List { state_dir, cluster }) => {
            let now = crate::authority::now_ms();
            let tickets = match etcd(cluster, &state_dir).await? {
                Some(fleet) => fleet.tickets().await?,
                None => Authority::new(StateDir::new(state_dir)).tickets(),
            };
            for t in tickets {
                let status = if t.uses_left == 0 {
                    "used".to_string()
                } else if now >= t.expires_at_ms {
                    "expired".to_string()
                } else {
                    format!(
                        "valid {}s, {} use(s) left",
                        (t.expires_at_ms - now) / 1000,
                        t.uses_left
                    )
                };
                println!("{}  {:?}  {}", t.id, t.attrs, status);
            }
            Ok(())
        }
        Command::Identity(IdentityCommand::List { state_dir, cluster }) => {
            let identities = match etcd(cluster, &state_dir).await? {
                Some(fleet) => fleet.identities().await?,
                None => Authority::new(StateDir::new(state_dir)).identities(),
            };
            for i in identities {
                let status = if i.revoked { "REVOKED" } else { "active" };
                println!("{}  {:?}  {}", i.name, i.attrs, status);
            }
            Ok(())
        }
        Command::Identity(IdentityCommand::Revoke {
            name,
            state_dir,
            admin_addr,
            cluster,
        }) => match etcd(cluster, &state_dir).await? {
            Some(fleet) => {
                let existed = fleet.revoke(name.clone()).await?;
                println!(
                    "revoked {name} in {}{}: every relay of the fleet cuts it off within a second",
                    fleet.describe(),
                    if existed {
                        ""
                    } else {
                        " (no such enrolled identity; the name is refused from now on)"
                    }
                );
                Ok(())
            }
            None => revoke(name, state_dir, admin_addr).await,
        },
        Command::Ca(CaCommand::Fingerprint { state_dir }) => {
            println!("{}", StateDir::new(state_dir).load_ca()?.fingerprint());
            Ok(())
        }
        Command::Status(args) => status(args).await,
        Command::Reload(args) => reload(args).await,
    }
}

/// The fleet's shared state in etcd, when `--etcd` is given (`state_dir` holds the CA for
/// creating tickets).
async fn etcd(
    cluster: ClusterArgs,
    state_dir: &std::path::Path,
) -> anyhow::Result<Option<crate::fleet::etcd::Etcd>> {
    let Some(cfg) = cluster.resolve(None).map_err(anyhow::Error::msg)? else {
        return Ok(None);
    };
    let state = StateDir::new(state_dir);
    Ok(Some(
        crate::fleet::etcd::Etcd::connect(&cfg, Some(state)).await?,
    ))
}

/// `identity revoke`: at the running relay when there is one, else in the state directory,
/// and never in a directory that is not a relay's (which would report a revocation no relay
/// ever applies).
async fn revoke(
    name: NodeName,
    state_dir: PathBuf,
    admin_addr: Option<std::net::SocketAddr>,
) -> anyhow::Result<()> {
    use crate::admin::{self, client::AdminClient, client::ClientError, AdminToken};
    let state = StateDir::new(&state_dir);
    if !state.ca_key().exists() {
        anyhow::bail!(
            "{} holds no project CA ({} is missing): it is not the state directory of the relay \
             that enrolls nodes. Pass the --state-dir the relay runs with (the one \
             `postern-relay ca init` made); nothing was revoked",
            state_dir.display(),
            state.ca_key().display()
        );
    }
    let addr = match admin_addr {
        Some(a) => a,
        None => admin::parse_admin_addr(admin::DEFAULT_ADMIN_ADDR)
            .map_err(anyhow::Error::msg)?
            .context("no default admin address")?,
    };
    let token_file = state_dir.join(admin::TOKEN_FILE);
    if token_file.exists() {
        let token = AdminToken::load(&token_file)
            .with_context(|| format!("cannot read the admin token {}", token_file.display()))?;
        let path = format!("/v1/identities/{name}/revoke");
        match AdminClient::new(addr, token)
            .post::<crate::views::Revoked>(&path)
            .await
        {
            Ok(done) => {
                println!(
                    "revoked {name} at the running relay (admin API {addr}, state directory {}){}{}",
                    state_dir.display(),
                    if done.was_connected {
                        "; it was connected and has been cut off"
                    } else {
                        "; it was not connected"
                    },
                    if done.persisted {
                        ""
                    } else {
                        "; that relay has no authority, so this lasts until it restarts"
                    }
                );
                return Ok(());
            }
            Err(ClientError::NotRunning { .. }) => {}
            Err(e) => {
                return Err(anyhow::Error::new(e).context(format!(
                    "the relay at admin API {addr} did not apply the revocation (is it the relay \
                     of {}? pass its --admin-addr); nothing was revoked",
                    state_dir.display()
                )))
            }
        }
    }
    let existed = Authority::new(state).revoke(&name)?;
    let what = if existed {
        ""
    } else {
        " (no such enrolled identity; the name is refused from now on)"
    };
    println!(
        "revoked {name} in {}{what}: no relay answers at admin API {addr}, so no running relay \
         applied it; a relay running from this directory drops the node within a second, one \
         started from it refuses it",
        state_dir.display()
    );
    Ok(())
}

/// `status`: asks a running relay's admin API for its state and prints it.
pub async fn status(args: StatusArgs) -> anyhow::Result<()> {
    if let Some(cfg) = args
        .cluster
        .clone()
        .resolve(None)
        .map_err(anyhow::Error::msg)?
    {
        return fleet_status(&cfg, args.json).await;
    }
    let client = admin_client(
        args.admin_addr,
        args.config.as_deref(),
        args.state_dir,
        args.admin_token_file,
    )?;
    let state = client.status().await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&state)?);
    } else {
        print!("{}", state.render());
    }
    Ok(())
}

/// `reload`: asks a running relay's admin API to reread its config; a refusal is an error.
pub async fn reload(args: ReloadArgs) -> anyhow::Result<()> {
    use crate::admin::client::ClientError;
    let client = admin_client(
        args.admin_addr,
        args.config.as_deref(),
        args.state_dir,
        args.admin_token_file,
    )?;
    match client.post::<crate::reload::Reloaded>("/v1/reload").await {
        Ok(done) => {
            println!(
                "config reloaded: log level {}, {} live route(s) closed and {} registration(s) \
                 withdrawn by the new policy",
                done.log_level.as_deref().unwrap_or("unchanged"),
                done.policy.routes_closed,
                done.policy.registrations_withdrawn
            );
            Ok(())
        }
        Err(ClientError::Api {
            status: 422,
            message,
            ..
        }) => anyhow::bail!("{message}"),
        Err(e) => Err(e.into()),
    }
}

/// A client of the admin API of the relay that `config`, `state_dir` and the flags name.
fn admin_client(
    admin_addr: Option<std::net::SocketAddr>,
    config: Option<&std::path::Path>,
    state_dir: Option<PathBuf>,
    admin_token_file: Option<PathBuf>,
) -> anyhow::Result<crate::admin::client::AdminClient> {
    use crate::admin::{self, client::AdminClient, AdminToken};
    let file: crate::config::RelayFile = match config {
        Some(p) => postern_net::runtime::files::load_toml(p)?,
        None => Default::default(),
    };
    let addr = match admin_addr {
        Some(a) => a,
        None => {
            let text = file
                .admin_addr
                .as_deref()
                .unwrap_or(admin::DEFAULT_ADMIN_ADDR);
            admin::parse_admin_addr(text)
                .map_err(anyhow::Error::msg)?
                .context("the relay's config turns the admin API off (admin-addr = \"off\")")?
        }
    };
    let token_file = admin_token_file.unwrap_or_else(|| {
        state_dir
            .or(file.state_dir)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR))
            .join(admin::TOKEN_FILE)
    });
    let token = AdminToken::load(&token_file).with_context(|| {
        format!(
            "cannot read the admin token (made by the relay at its first start; pass --state-dir or --admin-token-file): {}",
            token_file.display()
        )
    })?;
    Ok(AdminClient::new(addr, token))
}

/// `status --etcd`: the fleet as etcd holds it, without asking any relay.
async fn fleet_status(cfg: &crate::fleet::ClusterConfig, json: bool) -> anyhow::Result<()> {
    use crate::fleet::view::{fleet_view, Attachments};
    let fleet = crate::fleet::etcd::Etcd::connect(cfg, None).await?;
    let view = fleet_view(&fleet, None, Attachments::None).await;
    if json {
        println!("{}", serde_json::to_string_pretty(&view)?);
    } else {
        print!("{}", crate::admin::client::render_fleet(&view));
    }
    if let Some(e) = &view.relays_error {
        anyhow::bail!("cannot list the fleet's relays: {e}");
    }
    Ok(())
}
