//! Public hostname certificates the outlet gets from the authority itself.
//!
//! A service offered publicly without certificate files of its own is served with a
//! certificate for `<service>.<public-domain>` that the outlet asks the relay's authority for
//! over its control connection (`Ctl::PublicCertRequest`). The key pair is made here and the
//! private key never leaves this machine: only a certificate request travels. The pair is kept
//! in `<state-dir>/public/<host>.{pem,key}` (mode 0600, replaced the same crash-safe way as the
//! node's own certificate), so a restart serves at once, and it is renewed on the node
//! certificate's schedule ([`postern_net::control::renew::keep_fresh`]). The TLS acceptor reads
//! the certificate in force at each handshake, so a renewal reaches new connections at once
//! and open ones keep theirs.

use postern_net::control::exchange::{self, CTL_TIMEOUT};
use postern_net::control::renew::{self, RenewError};
use postern_net::runtime::files;
use postern_net::stream::tls_server::{self, TlsAcceptor};
use postern_net::uplink::ControlWatch;
use postern_proto::msg::Ctl;
use postern_proto::name::ServiceName;
use postern_proto::pki::{self, PkiError};
use postern_proto::tls::Identity;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;
use tokio_util::sync::CancellationToken;

/// The certificate a public hostname is served with now (none until the first one arrives:
/// handshakes fail until then).
#[derive(Debug, Default)]
pub struct HostCert {
    current: RwLock<Option<Arc<CertifiedKey>>>,
}

impl HostCert {
    fn set(&self, key: CertifiedKey) {
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(key));
    }

    /// Whether a certificate is in force.
    pub fn ready(&self) -> bool {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }
}

impl ResolvesServerCert for HostCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// Where the certificate for `host` and its key are kept.
pub fn paths(state_dir: &Path, host: &str) -> (PathBuf, PathBuf) {
    let dir = state_dir.join("public");
    (
        dir.join(format!("{host}.pem")),
        dir.join(format!("{host}.key")),
    )
}

/// One fetched hostname certificate: what to ask for and where it lives.
#[derive(Debug, Clone)]
pub struct Fetched {
    pub service: ServiceName,
    pub host: String,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub slot: Arc<HostCert>,
}

impl Fetched {
    /// Serves `host` of `service` with certificates kept in `state_dir`: the acceptor serves
    /// the stored certificate at once if there is a usable one, else none until [`run`]
    /// fetches it.
    pub fn new(
        state_dir: &Path,
        service: ServiceName,
        host: String,
    ) -> Result<(Self, TlsAcceptor), rustls::Error> {
        let (cert, key) = paths(state_dir, &host);
        renew::recover_pair(&key, &cert);
        let slot = Arc::new(HostCert::default());
        let acceptor = TlsAcceptor::from(Arc::new(tls_server::resolving_config(slot.clone())?));
        let me = Self {
            service,
            host,
            cert,
            key,
            slot,
        };
        if me.stored_names_host() {
            match me.load() {
                Ok(()) => {
                    tracing::info!(host = %me.host, "serving the stored public hostname certificate")
                }
                Err(e) => {
                    tracing::warn!(host = %me.host, error = %e, "the stored public hostname certificate is unusable; asking for a new one")
                }
            }
        }
        Ok((me, acceptor))
    }

    /// Whether the stored certificate is for this host (not one of an earlier domain).
    fn stored_names_host(&self) -> bool {
        files::read(&self.cert)
            .ok()
            .and_then(|pem| pki::first_cert(&pem).ok())
            .and_then(|der| pki::cert_name(&der).ok())
            .is_some_and(|n| n.as_str() == self.host)
    }

    fn load(&self) -> Result<(), RenewError> {
        let identity = Identity::from_pem(&files::read(&self.cert)?, &files::read(&self.key)?)?;
        self.serve(&identity)
    }

    fn serve(&self, identity: &Identity) -> Result<(), RenewError> {
        let key = tls_server::certified_key(identity)
            .map_err(|e| RenewError::Pki(PkiError::Parse(e.to_string())))?;
        self.slot.set(key);
        Ok(())
    }

    /// When to ask next: now when there is no usable certificate for this host, else at two
    /// thirds of its life.
    fn due(&self) -> SystemTime {
        match (self.slot.ready() && self.stored_names_host())
            .then(|| renew::due(&self.cert))
            .flatten()
        {
            Some(at) => at,
            None => SystemTime::UNIX_EPOCH,
        }
    }

    /// Asks the authority over `conn` for a certificate for a fresh key, stores the pair and
    /// serves it.
    pub async fn fetch_once(&self, conn: &quinn::Connection) -> Result<(), RenewError> {
        let (csr_pem, key) = pki::make_hostname_csr(&self.host)?;
        let ask = Ctl::PublicCertRequest {
            service: self.service.clone(),
            hostname: self.host.clone(),
            csr_pem,
        };
        let cert_pem = match exchange::request(conn, &ask, CTL_TIMEOUT).await? {
            Ctl::PublicCertIssued { cert_pem } => cert_pem,
            Ctl::Refused { reason } => return Err(RenewError::Refused(reason)),
            _ => return Err(RenewError::Unexpected),
        };
        let name = pki::cert_name(&pki::first_cert(&cert_pem)?)?;
        if name.as_str() != self.host {
            tracing::error!(asked = %self.host, got = %name, "the authority signed another hostname");
            return Err(RenewError::Unexpected);
        }
        // Key and certificate must match before anything on disk changes.
        let identity = Identity::from_pem(&cert_pem, &key.0)?;
        tls_server::certified_key(&identity)
            .map_err(|e| RenewError::Pki(PkiError::Parse(e.to_string())))?;
        renew::store_pair(&self.key, &self.cert, &key.0, &cert_pem)?;
        self.serve(&identity)?;
        let until = pki::cert_validity(&identity.certs[0]).map(|(_, until)| until);
        tracing::info!(host = %self.host, valid_until = ?until.ok(), "public hostname certificate from the authority in force");
        Ok(())
    }

    /// Fetches the certificate when there is none, then keeps it fresh until `shutdown`.
    pub async fn run(self, control: ControlWatch, shutdown: CancellationToken) {
        let what = format!("public hostname certificate for {}", self.host);
        let me = Arc::new(self);
        let (due, fetch) = (me.clone(), me.clone());
        renew::keep_fresh(
            &what,
            control,
            move || Some(due.due()),
            move |conn: quinn::Connection| {
                let me = fetch.clone();
                async move { me.fetch_once(&conn).await }
            },
            |()| {},
            shutdown,
        )
        .await;
    }
}
