//! Settings every node (outlet, inlet) shares: how to reach the relay and who it is.

use crate::runtime::files;
use crate::transport::relay_path::RelayTarget;
use anyhow::Context;
use postern_proto::tls::{self, Identity};
use rustls::RootCertStore;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::Arc;

/// The flags every node (inlet, outlet) takes to reach its relays and to prove who it is; each
/// binary flattens them into its `run` flags, and builds the same struct from its config file's
/// keys of the same names, so [`NodeFlags::over`] and [`NodeFlags::resolve`] merge them once.
#[derive(Debug, Default, Clone, clap::Args)]
pub struct NodeFlags {
    /// Relay address, `host:port`. Repeat it (or separate with commas) to use several relays
    /// at once: an outlet registers with every one; an inlet routes through the first one that
    /// is up and moves its connections to another when that relay goes away.
    #[arg(long, env = "POSTERN_RELAY", value_delimiter = ',')]
    pub relay: Vec<String>,
    /// How to reach the relays: `auto` tries QUIC over UDP and falls back to TLS 1.3 over TCP
    /// when the UDP handshake gets no answer within 3 s (UDP blocked); `udp` or `tcp` force
    /// one [default: auto].
    #[arg(long, value_name = "auto|udp|tcp")]
    pub transport: Option<crate::transport::relay_path::TransportMode>,
    /// Congestion controller of end-to-end connections: `bbr` keeps its rate through random
    /// loss, where `cubic` and `newreno` back off on every lost packet (bench/RESULTS.md,
    /// "Lossy paths") [default: bbr].
    #[arg(long, value_enum)]
    pub congestion: Option<crate::transport::endpoint::Congestion>,
    /// Whether end-to-end connections may move off the relay onto a direct UDP path between
    /// the two nodes when their NATs allow it (`auto`), or always go through the relay
    /// (`never`) [default: auto].
    #[arg(long, env = "POSTERN_DIRECT", value_name = "auto|never")]
    pub direct: Option<crate::transport::direct::DirectMode>,
    /// TCP port of the relays' TLS fallback listener [default: the relay's UDP port].
    #[arg(long)]
    pub relay_tcp_port: Option<u16>,
    /// Name the relay's certificate must carry [default: relay].
    #[arg(long)]
    pub relay_name: Option<String>,
    /// Enrollment ticket, used once if this node has not enrolled yet (see `enroll`). While
    /// the relay (authority) cannot be reached, `run` keeps trying; a ticket it refuses for good
    /// (used, expired, unknown) stops `run` with the reason.
    #[arg(long, env = "POSTERN_TICKET", hide_env_values = true)]
    pub ticket: Option<String>,
    /// Name to ask for when enrolling [default: inlet-<hostname> or outlet-<hostname>].
    #[arg(long)]
    pub name: Option<String>,
    /// This node's certificate (PEM), issued by the project CA [default: the enrolled one in
    /// the state directory].
    #[arg(long)]
    pub cert: Option<PathBuf>,
    /// This node's private key (PEM).
    #[arg(long)]
    pub key: Option<PathBuf>,
    /// The project CA certificate (PEM).
    #[arg(long)]
    pub ca: Option<PathBuf>,
}

impl NodeFlags {
    /// These flags, each falling back to `file`'s value where it is unset.
    pub fn over(self, file: NodeFlags) -> NodeFlags {
        NodeFlags {
            relay: if self.relay.is_empty() {
                file.relay
            } else {
                self.relay
            },
            transport: self.transport.or(file.transport),
            congestion: self.congestion.or(file.congestion),
            direct: self.direct.or(file.direct),
            relay_tcp_port: self.relay_tcp_port.or(file.relay_tcp_port),
            relay_name: self.relay_name.or(file.relay_name),
            ticket: self.ticket.or(file.ticket),
            name: self.name.or(file.name),
            cert: self.cert.or(file.cert),
            key: self.key.or(file.key),
            ca: self.ca.or(file.ca),
        }
    }

    /// Splits into the node's identity settings, the relays after the first, and how to
    /// reach them.
    pub fn resolve(
        self,
    ) -> (
        NodeArgs,
        Vec<String>,
        crate::transport::relay_path::TransportSettings,
    ) {
        let (first, more) = crate::transport::relay_path::merge_relays(self.relay, None);
        let transport = crate::transport::relay_path::TransportSettings {
            mode: self.transport.unwrap_or_default(),
            tcp_port: self.relay_tcp_port,
            udp_timeout: None,
            udp_probe_interval: None,
            congestion: self.congestion.unwrap_or_default(),
            direct: self.direct.unwrap_or_default(),
        };
        let node = NodeArgs {
            relay: first,
            relay_name: self.relay_name,
            cert: self.cert,
            key: self.key,
            ca: self.ca,
            ticket: self.ticket,
            name: self.name,
        };
        (node, more, transport)
    }
}

/// Resolved node settings.
#[derive(Debug, Clone)]
pub struct NodeSettings {
    /// Relay address, `host:port`.
    pub relay: String,
    /// Further relays named by the enrollment ticket, used when no `relay` was configured.
    pub more_relays: Vec<String>,
    /// Name in the relay's certificate.
    pub relay_name: String,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

/// Default relay certificate name.
pub const DEFAULT_RELAY_NAME: &str = "relay";

impl NodeSettings {
    /// Loads the node's identity, the project CA and resolves the relay's address.
    pub fn load(&self) -> anyhow::Result<(RelayTarget, Identity, Arc<RootCertStore>)> {
        let addr: SocketAddr = self
            .relay
            .to_socket_addrs()
            .with_context(|| format!("relay: cannot resolve {:?}", self.relay))?
            .next()
            .with_context(|| format!("relay: {:?} resolves to no address", self.relay))?;
        let cert = files::read(&self.cert).context("cert")?;
        let key = files::read(&self.key).context("key")?;
        let identity = Identity::from_pem(&cert, &key).with_context(|| {
            format!("cert/key: {} / {}", self.cert.display(), self.key.display())
        })?;
        let roots = tls::roots_from_pem(&files::read(&self.ca).context("ca")?)
            .with_context(|| format!("ca: {}", self.ca.display()))?;
        Ok((
            RelayTarget {
                addr,
                name: self.relay_name.clone(),
            },
            identity,
            roots,
        ))
    }
}

/// Takes the flag, else the file's value, else fails naming the key.
pub fn required<T>(flag: Option<T>, file: Option<T>, key: &str) -> anyhow::Result<T> {
    flag.or(file)
        .with_context(|| format!("missing `{key}`: set it in the config file or pass --{key}"))
}

/// The identity-related settings as given by flags and the config file (flags already merged
/// over the file), before enrollment state is consulted.
#[derive(Debug, Clone, Default)]
pub struct NodeArgs {
    pub relay: Option<String>,
    pub relay_name: Option<String>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub ca: Option<PathBuf>,
    /// Enrollment ticket to use if the node has not enrolled yet.
    pub ticket: Option<String>,
    /// Name to ask for at enrollment.
    pub name: Option<String>,
}

/// A default node name: the host name, made into a valid name, with the role in front.
pub fn default_name(role: &str) -> postern_proto::name::NodeName {
    let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
    let cleaned: String = host
        .trim()
        .to_ascii_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '-'
            }
        })
        .collect();
    let candidate = format!("{role}-{}", cleaned.trim_matches('-'));
    postern_proto::name::NodeName::new(candidate.trim_end_matches('-'))
        .or_else(|_| postern_proto::name::NodeName::new(role))
        .unwrap_or_else(|_| unreachable!("role names are valid node names"))
}

/// Resolves the node's settings: explicit files win; otherwise the enrolled identity in
/// `state_dir`; otherwise enrolls now with the ticket (if one was given), retrying while the
/// relay (authority) cannot be reached. `None` when `shutdown` came before enrollment did.
pub async fn prepare(
    args: NodeArgs,
    state_dir: &std::path::Path,
    role: &str,
    shutdown: &tokio_util::sync::CancellationToken,
) -> anyhow::Result<Option<NodeSettings>> {
    use crate::control::enroll::{enroll_retrying, NodeState};
    let state = NodeState::new(state_dir);
    // The identity, leases and grants live here: tighten a directory an older install or a
    // hand-made one left open to other users (a missing one is made private by its first write).
    if state_dir.exists() {
        files::private_dir(state_dir)?;
    }
    let explicit = args.cert.is_some() || args.key.is_some() || args.ca.is_some();
    if !explicit && !state.is_enrolled() {
        let Some(text) = args.ticket.as_deref() else {
            anyhow::bail!(
                "this {role} has no identity yet: run `postern-{role} enroll TICKET --state-dir {}` (or set `ticket` / POSTERN_TICKET), or give `cert`, `key` and `ca`",
                state_dir.display()
            );
        };
        let ticket = postern_proto::ticket::Ticket::decode(text).context("ticket")?;
        let name = match &args.name {
            Some(n) => n.parse().context("name")?,
            None => default_name(role),
        };
        let Some(info) = enroll_retrying(&ticket, &name, &state, shutdown)
            .await
            .context("enrollment")?
        else {
            return Ok(None);
        };
        tracing::info!(name = %info.name, attrs = ?info.attrs, "enrolled");
    }
    if explicit {
        return Ok(Some(NodeSettings {
            relay: required(args.relay, None, "relay")?,
            more_relays: Vec::new(),
            relay_name: args.relay_name.unwrap_or_else(|| DEFAULT_RELAY_NAME.into()),
            cert: required(args.cert, None, "cert")?,
            key: required(args.key, None, "key")?,
            ca: required(args.ca, None, "ca")?,
        }));
    }
    let info = state.info().context("enrolled state")?;
    let more_relays = match args.relay {
        Some(_) => Vec::new(),
        None => info.relays.iter().skip(1).cloned().collect(),
    };
    Ok(Some(NodeSettings {
        more_relays,
        relay: match args.relay {
            Some(r) => r,
            None => info
                .relays
                .first()
                .cloned()
                .context("the ticket named no relay: set `relay`")?,
        },
        relay_name: args.relay_name.unwrap_or(info.relay_name),
        cert: state.cert(),
        key: state.key(),
        ca: state.ca(),
    }))
}

/// `postern-<role> enroll TICKET [--name NAME] --state-dir DIR`: enrolls and says what it got.
pub async fn enroll_command(
    role: &str,
    ticket: &str,
    name: Option<String>,
    state_dir: &std::path::Path,
) -> anyhow::Result<()> {
    use crate::control::enroll::{enroll, NodeState};
    let state = NodeState::new(state_dir);
    // Checked before the ticket is used, so that a second `enroll` neither spends a ticket nor
    // reads as a problem with it.
    if state.is_enrolled() {
        let who = match state.info() {
            Ok(info) => format!("as {} with attributes {:?}", info.name, info.attrs),
            Err(_) => "(its enrollment record is unreadable)".to_owned(),
        };
        anyhow::bail!(
            "{} is already enrolled {who}; `postern-{role} run --state-dir {}` uses that \
             identity. To enroll again, move that directory away (or pass another --state-dir) \
             and enroll with a new ticket",
            state_dir.display(),
            state_dir.display()
        );
    }
    let ticket = postern_proto::ticket::Ticket::decode(ticket).context("ticket")?;
    let name = match name {
        Some(n) => n.parse().context("--name")?,
        None => default_name(role),
    };
    let info = enroll(&ticket, &name, &state).await?;
    println!("enrolled as {} with attributes {:?}", info.name, info.attrs);
    println!("identity stored in {}", state_dir.display());
    Ok(())
}
