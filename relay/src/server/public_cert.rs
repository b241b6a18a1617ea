//! Public hostname certificates for outlets, over their control connection
//! (`Ctl::PublicCertRequest`): an outlet that offers a service publicly asks for a certificate
//! for `<service>.<public domain>` instead of being handed files. The outlet made the key pair
//! and sends only a certificate request; the authority signs it when the policy allows the
//! outlet to register the service (the same rule that lets it offer the service publicly), and
//! only for the one hostname the relay's ingress routes to that service.

use super::dispatch::refused;
use super::shared::Shared;
use crate::policy::Action;
use crate::registry::NodeId;
use postern_proto::msg::{Ctl, Refusal};
use postern_proto::name::ServiceName;
use std::sync::Arc;
use std::time::Duration;

/// What the relay signs public hostname certificates for (set with the public ingress).
#[derive(Debug, Clone)]
pub struct PublicCerts {
    /// The ingress' domain: `<service>.<domain>` is the only name a service's outlet gets.
    pub domain: String,
    /// Lifetime of each certificate (`public-cert-validity`).
    pub validity: Duration,
}

/// The answer to an outlet's `PublicCertRequest`.
pub(super) async fn issue(
    shared: &Arc<Shared>,
    id: NodeId,
    service: ServiceName,
    hostname: String,
    csr_pem: String,
) -> Ctl {
    let fleet = shared.fleet();
    if !fleet.runs_authority() {
        return refused(Refusal::NoAuthority);
    }
    let (name, attrs) = {
        let reg = shared.registry();
        (reg.name(id).cloned(), reg.attrs(id))
    };
    let Some(name) = name else {
        return refused(Refusal::UnknownNode);
    };
    let certs = shared
        .public_certs
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let Some(certs) = certs else {
        return refused(Refusal::PublicCertRefused {
            hostname,
            why: "this relay has no public hostname ingress (--public-addr/--public-domain)".into(),
        });
    };
    let expected = format!("{service}.{}", certs.domain);
    if !hostname.eq_ignore_ascii_case(&expected) {
        tracing::info!(target: "postern::audit", event = "public_cert", node = %name, %service, %hostname, allowed = false, "public hostname certificate refused: not the service's hostname");
        tracing::warn!(node = %name, %hostname, %expected, "public hostname certificate refused: not the service's hostname here");
        return refused(Refusal::PublicCertRefused {
            why: format!(
                "the relay's public ingress reaches {service} only as {expected} (check the \
                 outlet's public-domain against the relay's --public-domain)"
            ),
            hostname,
        });
    }
    let d = shared
        .policy()
        .decide(Action::Register, &service, &name, &attrs);
    tracing::info!(target: "postern::audit", event = "policy", action = "public_cert", node = %name, %service, allowed = d.allowed, rule = %d.rule);
    if !d.allowed {
        return refused(Refusal::NotAllowed {
            action: "public_cert".into(),
            service,
            attrs,
            rule: d.rule,
        });
    }
    match fleet
        .issue_hostname(name, expected, csr_pem, certs.validity)
        .await
    {
        Ok(cert_pem) => Ctl::PublicCertIssued { cert_pem },
        Err(reason) => refused(reason),
    }
}
