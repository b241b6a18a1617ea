//! rustls configurations for the control and end-to-end connections.
//!
//! TLS 1.3 only, mutual authentication always: servers require a client certificate chained to
//! the project CA, clients verify the server against the same CA and the expected node name.
//! Nothing here can be configured to skip verification.

use crate::pki::{certs_from_pem, PkiError};
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::sync::Arc;

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client verifier: {0}")]
    Verifier(String),
    #[error("CA bundle holds no usable certificate")]
    NoRoots,
}

/// The crypto provider every postern TLS configuration uses.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A node's certificate chain and private key.
pub struct Identity {
    pub certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("certs", &self.certs.len())
            .finish_non_exhaustive()
    }
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Self {
            certs: self.certs.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl Identity {
    /// Parses a PEM certificate chain and a PEM private key.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        let certs = certs_from_pem(cert_pem)?;
        if certs.is_empty() {
            return Err(PkiError::NoCertificate);
        }
        let key = rustls_pemfile::private_key(&mut key_pem.as_bytes())
            .map_err(|e| PkiError::Pem(e.to_string()))?
            .ok_or(PkiError::NoKey)?;
        Ok(Self { certs, key })
    }

    /// The private key (for building TLS configurations).
    pub fn key(&self) -> PrivateKeyDer<'static> {
        self.key.clone_key()
    }
}

/// Builds a root store from a PEM CA bundle.
pub fn roots_from_pem(ca_pem: &str) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in certs_from_pem(ca_pem)? {
        roots.add(cert)?;
    }
    if roots.is_empty() {
        return Err(TlsError::NoRoots);
    }
    Ok(Arc::new(roots))
}

/// Server side: requires a client certificate from the project CA.
pub fn server_config(
    identity: &Identity,
    roots: Arc<RootCertStore>,
    alpn: &[&[u8]],
) -> Result<ServerConfig, TlsError> {
    server_config_with(identity, roots, alpn, false)
}

/// Server side; with `client_cert_optional` a client may connect without a certificate (for
/// enrollment, where the node has none yet). A certificate that *is* presented must still chain
/// to the project CA, and the application must refuse uncertified peers for anything else.
pub fn server_config_with(
    identity: &Identity,
    roots: Arc<RootCertStore>,
    alpn: &[&[u8]],
    client_cert_optional: bool,
) -> Result<ServerConfig, TlsError> {
    let builder = WebPkiClientVerifier::builder_with_provider(roots, provider());
    let builder = if client_cert_optional {
        builder.allow_unauthenticated()
    } else {
        builder
    };
    let verifier = builder
        .build()
        .map_err(|e| TlsError::Verifier(e.to_string()))?;
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(identity.certs.clone(), identity.key())?;
    cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    Ok(cfg)
}

/// Client side: presents our certificate and verifies the server against the project CA.
pub fn client_config(
    identity: &Identity,
    roots: Arc<RootCertStore>,
    alpn: &[&[u8]],
) -> Result<ClientConfig, TlsError> {
    let mut cfg = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_client_auth_cert(identity.certs.clone(), identity.key())?;
    cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    Ok(cfg)
}

/// Client side for enrollment: no client certificate, and the server is trusted only if its
/// chain includes a CA certificate with the pinned SHA-256 `ca_fingerprint` (from the ticket)
/// and its own certificate is valid under that CA for the expected name.
pub fn pinned_client_config(
    ca_fingerprint: &str,
    alpn: &[&[u8]],
) -> Result<ClientConfig, TlsError> {
    let verifier = Arc::new(PinnedCaVerifier {
        fingerprint: ca_fingerprint.to_ascii_lowercase(),
        provider: provider(),
    });
    let mut cfg = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    Ok(cfg)
}

/// Verifies the server against the CA whose fingerprint is pinned (full WebPKI verification,
/// with that CA as the only root). Skips nothing.
#[derive(Debug)]
struct PinnedCaVerifier {
    fingerprint: String,
    provider: Arc<CryptoProvider>,
}

impl rustls::client::danger::ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &rustls_pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| crate::pki::fingerprint(c) == self.fingerprint)
            .ok_or_else(|| {
                rustls::Error::General(
                    "the relay's CA does not match the fingerprint in the ticket".into(),
                )
            })?;
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            self.provider.clone(),
        )
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
        inner.verify_server_cert(end_entity, &[], server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
