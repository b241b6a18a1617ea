//! Services offered at the relay's public hostname, `https://<service>.<relay-domain>/`.
//!
//! The relay reads only the TLS server name and hands the outlet each such connection as a
//! stream on the control connection (`Ctl::PublicStream`), bytes unchanged. The outlet holds
//! the certificate: it terminates TLS here, so the relay never sees plaintext, then forwards
//! the connection to the service's target.

use crate::forward::{Drain, Services};
use postern_net::tls_server::{self, TlsAcceptor};
use postern_proto::msg::{code, Ctl};
use postern_proto::name::ServiceName;
use quinn::VarInt;
use std::collections::HashMap;
use std::sync::Arc;
use tracing::Instrument;

/// One service offered publicly.
pub struct PublicService {
    /// The full host name browsers open, e.g. `influxdb.relay.example.com`.
    pub host: String,
    /// TLS for that host name (certificate issued by the project CA, or the operator's).
    pub acceptor: TlsAcceptor,
}

/// Everything the outlet offers publicly.
#[derive(Default)]
pub struct Public {
    pub services: HashMap<ServiceName, PublicService>,
}

impl Public {
    /// Names of the services offered publicly.
    pub fn names(&self) -> Vec<ServiceName> {
        let mut names: Vec<ServiceName> = self.services.keys().cloned().collect();
        names.sort();
        names
    }
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
                    tracing::info!(error = %e, "public client's TLS handshake failed");
                    return;
                }
            };
            serve_tls(tls, &target).await;
            drop(token);
        }
        .instrument(span),
    );
}

/// Joins a public client's decrypted connection to the service's target.
async fn serve_tls<S>(mut tls: S, target: &crate::target::Target)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let result = match target.connect().await {
        Ok(crate::target::TargetStream::Tcp(mut tcp)) => {
            tokio::io::copy_bidirectional(&mut tls, &mut tcp).await
        }
        Ok(crate::target::TargetStream::Tls(mut t)) => {
            tokio::io::copy_bidirectional(&mut tls, &mut *t).await
        }
        Err(e) => {
            tracing::warn!(error = %e, "public client: target unreachable");
            return;
        }
    };
    match result {
        Ok((up, down)) => tracing::debug!(up, down, "public connection done"),
        Err(e) => tracing::debug!(error = %e, "public connection ended with an error"),
    }
}
