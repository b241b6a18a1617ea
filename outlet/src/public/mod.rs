//! Services offered at the relay's public hostname, `https://<service>.<relay-domain>/`.
//!
//! The relay reads only the TLS server name and hands the outlet each such connection as a
//! stream on the control connection (`Ctl::PublicStream`), bytes unchanged. The outlet holds
//! the certificate: it terminates TLS here, so the relay never sees plaintext, then serves the
//! decrypted HTTP/1.1 through the shared HTTP filter ([`postern_net::stream::http_proxy`]) with an
//! [`gate::AccessGate`]: only requests with a live access grant reach the target, each with the
//! grant's leased credential when the service has a lease manager.

pub mod access;
pub mod admin;
pub mod cert;
pub mod gate;

use crate::serve::Services;
use access::AccessStore;
use postern_net::runtime::drain::Drain;
use postern_net::stream::http_proxy::ProxyOptions;
use postern_net::stream::tls_server::{self, TlsAcceptor};
use postern_proto::http::FilterConfig;
use postern_proto::msg::{code, Ctl};
use postern_proto::name::ServiceName;
use quinn::VarInt;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncReadExt;

/// How long a public client may take, after the TLS handshake, to start its first request.
pub const FIRST_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
use tracing::Instrument;

/// One service offered publicly.
pub struct PublicService {
    /// The full host name browsers open, e.g. `influxdb.relay.example.com`.
    pub host: String,
    /// TLS for that host name (certificate issued by the project CA, or the operator's).
    pub acceptor: TlsAcceptor,
}

/// Everything the outlet offers publicly.
pub struct Public {
    pub services: HashMap<ServiceName, PublicService>,
    /// The access grants every request is checked against.
    pub access: Arc<AccessStore>,
    /// The relay's public port as browsers reach it (443 leaves it out of links).
    pub link_port: u16,
}

impl Public {
    /// The access link for a grant's secret, e.g.
    /// `https://influxdb.relay.example.com/_postern/access?grant=...`.
    pub fn link(&self, service: &ServiceName, secret: &str) -> Option<String> {
        let host = &self.services.get(service)?.host;
        let port = match self.link_port {
            443 => String::new(),
            p => format!(":{p}"),
        };
        Some(format!(
            "https://{host}{port}{}?grant={secret}",
            gate::ACCESS_PATH
        ))
    }

    /// Names of the services offered publicly.
    pub fn names(&self) -> Vec<ServiceName> {
        let mut names: Vec<ServiceName> = self.services.keys().cloned().collect();
        names.sort();
        names
    }
}

/// Most public client connections this outlet serves at once (lowered to fit the open-file
/// limit): each holds a TLS session and a connection to the target. Over it, a new stream is
/// reset at once, so the ones already open keep their file descriptors and memory.
pub const MAX_PUBLIC_CONNECTIONS: usize = 4096;

/// The outlet's cap on public client connections (one public path per process).
fn public_limit() -> &'static Arc<postern_net::runtime::limit::ConnLimit> {
    static LIMIT: std::sync::OnceLock<Arc<postern_net::runtime::limit::ConnLimit>> =
        std::sync::OnceLock::new();
    LIMIT.get_or_init(|| {
        postern_net::runtime::limit::ConnLimit::new(
            "outlet public hostname",
            postern_net::runtime::limit::default_cap(Some(MAX_PUBLIC_CONNECTIONS)),
        )
    })
}

/// Serves one stream the relay opened for a public client, on its own task.
pub fn spawn_stream(
    public: Arc<Public>,
    services: Arc<Services>,
    drain: Drain,
    open: Ctl,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let Ctl::PublicStream { service, client } = open else {
        return;
    };
    let refuse = |send: &mut quinn::SendStream, recv: &mut quinn::RecvStream, c: u32| {
        let _ = send.reset(VarInt::from_u32(c));
        let _ = recv.stop(VarInt::from_u32(c));
    };
    if drain.draining.is_cancelled() {
        return refuse(&mut send, &mut recv, code::SHUTDOWN);
    }
    let (Some(_), Some(target)) = (
        public.services.get(&service),
        services.targets.get(&service),
    ) else {
        tracing::warn!(%service, "relay sent a public stream for a service not offered publicly");
        return refuse(&mut send, &mut recv, code::UNKNOWN_SERVICE);
    };
    let Ok(slot) = public_limit().try_admit(false) else {
        metrics::counter!("postern_outlet_connections_refused_total", "service" => service.as_str().to_owned(), "reason" => "cap").increment(1);
        return refuse(&mut send, &mut recv, code::NOT_ALLOWED);
    };
    let target = target.clone();
    let token = drain.streams.token();
    let span = tracing::info_span!("public", %service, %client);
    tokio::spawn(
        async move {
            let Some(svc) = public.services.get(&service) else {
                return;
            };
            let tls = match tls_server::accept_io(
                &svc.acceptor,
                tokio::io::join(recv, send),
                tls_server::HANDSHAKE_TIMEOUT,
            )
            .await
            {
                Ok(t) => t,
                Err(e) => {
                    tls_server::log_handshake_failure(&e, "public hostname");
                    return;
                }
            };
            metrics::counter!("postern_outlet_public_connections_total", "service" => service.as_str().to_owned()).increment(1);
            // A client that completes TLS and then says nothing would hold one of the outlet's
            // public slots at the relay for ever: it must start its first request in time.
            let (mut tls_r, tls_w) = tokio::io::split(tls);
            let mut first = vec![0u8; 4096];
            let n = match tokio::time::timeout(FIRST_REQUEST_TIMEOUT, tls_r.read(&mut first)).await {
                Ok(Ok(n)) if n > 0 => n,
                Ok(_) => return,
                Err(_) => {
                    tracing::info!(timeout = ?FIRST_REQUEST_TIMEOUT, "public client sent no request in time; closing");
                    return;
                }
            };
            first.truncate(n);
            let client = tokio::io::join(std::io::Cursor::new(first).chain(tls_r), tls_w);
            let lease = services.leases.get(&service).cloned();
            let cfg = FilterConfig {
                // InfluxDB takes credentials from `u`/`p` too; only the lease may reach it.
                strip_query_credentials: lease.is_some(),
                ..FilterConfig::default()
            };
            let gate = gate::AccessGate::new(public.access.clone(), service.clone(), lease);
            let open = || target.connect_io();
            let opts = ProxyOptions::new("postern outlet", cfg);
            match postern_net::stream::http_proxy::proxy(client, open, gate, opts).await {
                Ok(stats) => tracing::debug!(
                    requests = stats.requests,
                    up = stats.bytes_up,
                    down = stats.bytes_down,
                    "public connection done"
                ),
                Err(e) => tracing::info!(error = %e, "public connection ended"),
            }
            drop(token);
            drop(slot);
        }
        .instrument(span),
    );
}
