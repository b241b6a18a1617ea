//! The project certificate authority and node certificates (rcgen).
//!
//! Every node holds a certificate signed by the project CA whose first DNS SAN is its
//! [`NodeName`]. Both ends of every connection check the other's certificate against the CA, and
//! the name in it is the identity used for routing and (later) policy.

use crate::name::NodeName;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls_pki_types::CertificateDer;
use sha2::{Digest, Sha256};
use std::time::Duration;

/// Why a certificate operation failed.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("no certificate found in PEM input")]
    NoCertificate,
    #[error("no private key found in PEM input")]
    NoKey,
    #[error("malformed PEM: {0}")]
    Pem(String),
    #[error("certificate could not be parsed: {0}")]
    Parse(String),
    #[error("certificate carries no valid node name: {0}")]
    NoName(String),
}

/// A node certificate and its private key, both PEM.
pub struct IssuedCert {
    pub cert_pem: String,
    /// PEM private key. Never log it.
    pub key_pem: String,
}

impl std::fmt::Debug for IssuedCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedCert").finish_non_exhaustive()
    }
}

/// The project CA: signs node certificates.
pub struct Ca {
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("fingerprint", &self.fingerprint())
            .finish_non_exhaustive()
    }
}

/// How long a generated CA is valid.
const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

fn validity(params: &mut CertificateParams, valid_for: Duration) {
    let now = std::time::SystemTime::now();
    // Allow for clocks a little behind ours.
    params.not_before = (now - Duration::from_secs(300)).into();
    params.not_after = (now + valid_for).into();
}

impl Ca {
    /// Makes a new CA with a fresh key.
    pub fn generate(project: &str) -> Result<Self, PkiError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(
            DnType::CommonName,
            format!("postern project CA ({project})"),
        );
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        validity(&mut params, CA_VALIDITY);
        let cert = params.self_signed(&key)?;
        let cert_pem = cert.pem();
        let cert_der = cert.der().clone();
        Ok(Self {
            cert_pem,
            cert_der,
            issuer: Issuer::new(params, key),
        })
    }

    /// Loads a CA from its PEM certificate and key.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        let key = KeyPair::from_pem(key_pem)?;
        let cert_der = first_cert(cert_pem)?;
        let issuer = Issuer::from_ca_cert_der(&cert_der, key)?;
        Ok(Self {
            cert_pem: cert_pem.to_owned(),
            cert_der,
            issuer,
        })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA private key, PEM. Only for writing it to the CA's own key file.
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// SHA-256 fingerprint of the CA certificate, hex.
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.cert_der)
    }

    /// Issues a certificate for `name`, valid for `valid_for`, usable as TLS client and server.
    pub fn issue(&self, name: &NodeName, valid_for: Duration) -> Result<IssuedCert, PkiError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec![name.to_string()])?;
        params
            .distinguished_name
            .push(DnType::CommonName, name.to_string());
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.subject_alt_names = vec![SanType::DnsName(name.as_str().try_into()?)];
        validity(&mut params, valid_for);
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// SHA-256 fingerprint of a DER certificate, lowercase hex.
pub fn fingerprint(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

/// The first certificate in a PEM bundle.
pub fn first_cert(pem: &str) -> Result<CertificateDer<'static>, PkiError> {
    certs_from_pem(pem)?
        .into_iter()
        .next()
        .ok_or(PkiError::NoCertificate)
}

/// All certificates in a PEM bundle.
pub fn certs_from_pem(pem: &str) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    rustls_pemfile::certs(&mut pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PkiError::Pem(e.to_string()))
}

/// The node name a certificate was issued to: its first DNS SAN.
pub fn cert_name(der: &[u8]) -> Result<NodeName, PkiError> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|e| PkiError::Parse(e.to_string()))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| PkiError::Parse(e.to_string()))?
        .ok_or_else(|| PkiError::NoName("no subjectAltName".into()))?;
    for gn in &san.value.general_names {
        if let x509_parser::extensions::GeneralName::DNSName(dns) = gn {
            return NodeName::new(dns).map_err(|e| PkiError::NoName(e.to_string()));
        }
    }
    Err(PkiError::NoName("no DNS name in subjectAltName".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_cert_names_the_node_and_ca_reloads() {
        let ca = Ca::generate("test").expect("ca");
        let name = NodeName::new("outlet-1").expect("name");
        let issued = ca.issue(&name, Duration::from_secs(60)).expect("issue");
        let der = first_cert(&issued.cert_pem).expect("cert");
        assert_eq!(cert_name(&der).expect("name"), name);

        let again = Ca::from_pem(ca.cert_pem(), &ca.key_pem()).expect("reload");
        assert_eq!(again.fingerprint(), ca.fingerprint());
        let other = again.issue(&name, Duration::from_secs(60)).expect("issue");
        assert_ne!(other.cert_pem, issued.cert_pem);
    }

    #[test]
    fn garbage_pem_is_an_error() {
        assert!(matches!(first_cert("nope"), Err(PkiError::NoCertificate)));
        assert!(Ca::from_pem("nope", "nope").is_err());
    }
}
