//! The project certificate authority and node certificates (rcgen).
//!
//! Every node holds a certificate signed by the project CA whose first DNS SAN is its
//! [`NodeName`]. Both ends of every connection check the other's certificate against the CA, and
//! the name in it is the identity used for routing and by policies (the `name` attribute).

use crate::name::NodeName;
use crate::policy::Attributes;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, CustomExtension, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls_pki_types::CertificateDer;
use sha2::{Digest, Sha256};
use std::time::Duration;

/// Why a certificate operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
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
    #[error("bad certificate request: {0}")]
    Csr(String),
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
        self.issue_with(name, &Attributes::new(), valid_for)
    }

    /// Issues a certificate (and a fresh key) for `name` carrying `attrs`.
    pub fn issue_with(
        &self,
        name: &NodeName,
        attrs: &Attributes,
        valid_for: Duration,
    ) -> Result<IssuedCert, PkiError> {
        let key = KeyPair::generate()?;
        let params = node_params(name, attrs, valid_for)?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Signs a node's certificate request. Only the CSR's public key is used (its signature
    /// proves the node holds the private key); name, attributes and validity are ours.
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        name: &NodeName,
        attrs: &Attributes,
        valid_for: Duration,
    ) -> Result<String, PkiError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| PkiError::Csr(e.to_string()))?;
        let signed = CertificateSigningRequestParams {
            params: node_params(name, attrs, valid_for)?,
            public_key: csr.public_key,
        }
        .signed_by(&self.issuer)?;
        Ok(signed.pem())
    }
}

impl Ca {
    /// Signs an outlet's request for the public hostname `hostname` (a browser-facing server
    /// certificate). Only the CSR's public key is used; the name and validity are ours. The
    /// certificate is for TLS servers only (no client authentication), so it cannot stand in
    /// for a node identity at the relay, and carries no attributes.
    pub fn sign_hostname_csr(
        &self,
        csr_pem: &str,
        hostname: &str,
        valid_for: Duration,
    ) -> Result<String, PkiError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| PkiError::Csr(e.to_string()))?;
        let signed = CertificateSigningRequestParams {
            params: hostname_params(hostname, valid_for)?,
            public_key: csr.public_key,
        }
        .signed_by(&self.issuer)?;
        Ok(signed.pem())
    }
}

/// A public hostname's certificate: server authentication only. Back-dated like node
/// certificates (clocks a little behind ours), but by at most a tenth of a short lifetime, so
/// that renewing at two thirds of it still falls after the issue.
fn hostname_params(hostname: &str, valid_for: Duration) -> Result<CertificateParams, PkiError> {
    NodeName::new(hostname).map_err(|e| PkiError::NoName(format!("{hostname:?}: {e}")))?;
    let mut params = CertificateParams::new(vec![hostname.to_owned()])?;
    params
        .distinguished_name
        .push(DnType::CommonName, hostname.to_owned());
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.subject_alt_names = vec![SanType::DnsName(hostname.try_into()?)];
    let now = std::time::SystemTime::now();
    let back = Duration::from_secs(300).min(valid_for / 10);
    params.not_before = (now - back).into();
    params.not_after = (now + valid_for).into();
    Ok(params)
}

/// A certificate request for `hostname` and its private key, both PEM (the key never leaves
/// the caller).
pub fn make_hostname_csr(hostname: &str) -> Result<(String, IssuedCertKey), PkiError> {
    let key = KeyPair::generate()?;
    let params = CertificateParams::new(vec![hostname.to_owned()])?;
    let csr = params.serialize_request(&key)?;
    let pem = csr.pem().map_err(|e| PkiError::Csr(e.to_string()))?;
    Ok((pem, IssuedCertKey(key.serialize_pem())))
}

/// OID of the certificate extension carrying a node's attributes (a UTF8String holding JSON).
pub const ATTRIBUTES_OID: &[u64] = &[1, 3, 6, 1, 4, 1, 59541, 1, 1];

fn node_params(
    name: &NodeName,
    attrs: &Attributes,
    valid_for: Duration,
) -> Result<CertificateParams, PkiError> {
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
    if !attrs.is_empty() {
        let json = serde_json::to_string(attrs).map_err(|e| PkiError::Parse(e.to_string()))?;
        params.custom_extensions = vec![CustomExtension::from_oid_content(
            ATTRIBUTES_OID,
            der_utf8_string(&json),
        )];
    }
    validity(&mut params, valid_for);
    Ok(params)
}

fn der_utf8_string(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = vec![0x0c];
    match b.len() {
        n if n < 0x80 => out.push(n as u8),
        n if n <= 0xff => out.extend_from_slice(&[0x81, n as u8]),
        n => out.extend_from_slice(&[0x82, (n >> 8) as u8, n as u8]),
    }
    out.extend_from_slice(b);
    out
}

fn parse_der_utf8_string(d: &[u8]) -> Option<&str> {
    let (&tag, rest) = d.split_first()?;
    if tag != 0x0c {
        return None;
    }
    let (&l0, rest) = rest.split_first()?;
    let (len, rest) = match l0 {
        n if n < 0x80 => (n as usize, rest),
        0x81 => (*rest.first()? as usize, rest.get(1..)?),
        0x82 => (
            (*rest.first()? as usize) << 8 | *rest.get(1)? as usize,
            rest.get(2..)?,
        ),
        _ => return None,
    };
    std::str::from_utf8(rest.get(..len)?).ok()
}

/// A node's certificate request and its private key, both PEM. The key stays with the node.
pub fn make_csr(name: &NodeName) -> Result<(String, IssuedCertKey), PkiError> {
    let key = KeyPair::generate()?;
    let params = CertificateParams::new(vec![name.to_string()])?;
    let csr = params.serialize_request(&key)?;
    let pem = csr.pem().map_err(|e| PkiError::Csr(e.to_string()))?;
    Ok((pem, IssuedCertKey(key.serialize_pem())))
}

/// A private key in PEM; `Debug` does not show it.
pub struct IssuedCertKey(pub String);

impl std::fmt::Debug for IssuedCertKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("IssuedCertKey(<redacted>)")
    }
}

/// The attributes a certificate carries (empty when it has none).
pub fn cert_attributes(der: &[u8]) -> Result<Attributes, PkiError> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|e| PkiError::Parse(e.to_string()))?;
    let oid_str = ATTRIBUTES_OID
        .iter()
        .map(|n| n.to_string())
        .collect::<Vec<_>>()
        .join(".");
    for ext in cert.extensions() {
        if ext.oid.to_id_string() == oid_str {
            let text = parse_der_utf8_string(ext.value)
                .ok_or_else(|| PkiError::Parse("malformed attributes extension".into()))?;
            return serde_json::from_str(text)
                .map_err(|e| PkiError::Parse(format!("malformed attributes JSON: {e}")));
        }
    }
    Ok(Attributes::new())
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

/// A certificate's validity period.
pub fn cert_validity(
    der: &[u8],
) -> Result<(std::time::SystemTime, std::time::SystemTime), PkiError> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|e| PkiError::Parse(e.to_string()))?;
    let at = |t: x509_parser::time::ASN1Time| {
        std::time::UNIX_EPOCH + Duration::from_secs(t.timestamp().max(0) as u64)
    };
    Ok((
        at(cert.validity().not_before),
        at(cert.validity().not_after),
    ))
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
    fn attributes_travel_in_the_certificate() {
        let ca = Ca::generate("test").expect("ca");
        let name = NodeName::new("inlet-1").expect("name");
        let mut attrs = Attributes::new();
        attrs.insert("role".into(), "influxdb-client".into());
        attrs.insert("team".into(), "ops \"blue\" \\ x".into());
        let issued = ca
            .issue_with(&name, &attrs, Duration::from_secs(60))
            .expect("issue");
        let der = first_cert(&issued.cert_pem).expect("cert");
        assert_eq!(cert_attributes(&der).expect("attrs"), attrs);
        let plain = ca.issue(&name, Duration::from_secs(60)).expect("issue");
        let der = first_cert(&plain.cert_pem).expect("cert");
        assert!(cert_attributes(&der).expect("attrs").is_empty());
    }

    #[test]
    fn csr_is_signed_with_our_name_and_attributes() {
        let ca = Ca::generate("test").expect("ca");
        let asked = NodeName::new("asked-for").expect("name");
        let (csr, key) = make_csr(&asked).expect("csr");
        let granted = NodeName::new("granted").expect("name");
        let mut attrs = Attributes::new();
        attrs.insert("role".into(), "influxdb-outlet".into());
        let cert = ca
            .sign_csr(&csr, &granted, &attrs, Duration::from_secs(60))
            .expect("sign");
        let der = first_cert(&cert).expect("cert");
        assert_eq!(cert_name(&der).expect("name"), granted);
        assert_eq!(cert_attributes(&der).expect("attrs"), attrs);
        // The certificate goes with the node's own key.
        crate::tls::Identity::from_pem(&cert, &key.0).expect("identity");
        assert!(ca
            .sign_csr("garbage", &granted, &attrs, Duration::from_secs(60))
            .is_err());
    }

    #[test]
    fn validity_is_read_back() {
        let ca = Ca::generate("test").expect("ca");
        let name = NodeName::new("n").expect("name");
        let issued = ca.issue(&name, Duration::from_secs(3600)).expect("issue");
        let der = first_cert(&issued.cert_pem).expect("cert");
        let (from, until) = cert_validity(&der).expect("validity");
        let span = until.duration_since(from).expect("ordered");
        // Issued 5 minutes back-dated, valid for an hour from now.
        assert!(
            span >= Duration::from_secs(3600) && span <= Duration::from_secs(3600 + 301),
            "{span:?}"
        );
    }

    /// A hostname certificate names the host, serves TLS only, and goes with the asker's key.
    #[test]
    fn hostname_certificates_are_for_servers_only() {
        let ca = Ca::generate("test").expect("ca");
        let (csr, key) = make_hostname_csr("web.pub.localhost").expect("csr");
        let cert = ca
            .sign_hostname_csr(&csr, "web.pub.localhost", Duration::from_secs(6))
            .expect("sign");
        let der = first_cert(&cert).expect("cert");
        assert_eq!(cert_name(&der).expect("name").as_str(), "web.pub.localhost");
        crate::tls::Identity::from_pem(&cert, &key.0).expect("identity");
        let (_, parsed) = x509_parser::parse_x509_certificate(&der).expect("parse");
        let eku = parsed
            .extended_key_usage()
            .expect("eku")
            .expect("has eku")
            .value;
        assert!(eku.server_auth && !eku.client_auth, "{eku:?}");
        // A short lifetime is back-dated by a tenth of it, not five minutes.
        let (from, until) = cert_validity(&der).expect("validity");
        let span = until.duration_since(from).expect("ordered");
        assert!(span <= Duration::from_secs(8), "{span:?}");
        assert!(ca
            .sign_hostname_csr(&csr, "Not A Host", Duration::from_secs(6))
            .is_err());
    }

    #[test]
    fn garbage_pem_is_an_error() {
        assert!(matches!(first_cert("nope"), Err(PkiError::NoCertificate)));
        assert!(Ca::from_pem("nope", "nope").is_err());
    }
}
