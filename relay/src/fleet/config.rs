//! The `cluster` table of relay.toml and its flags: which etcd cluster holds the fleet's
//! shared state, under which key prefix, and how to authenticate to it. Credentials are
//! references (`env:NAME`, `file:PATH`), never plaintext in the config.

use clap::Args;
use serde::Deserialize;
use std::path::PathBuf;
use std::time::Duration;
use zeroize::Zeroizing;

/// Default key prefix in etcd.
pub const DEFAULT_PREFIX: &str = "/postern";
/// Default time to live of a relay's membership lease: a dead relay leaves the fleet this long
/// after its last keep-alive.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(10);

/// `cluster = { etcd = [...], prefix = "/postern" }` in relay.toml.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ClusterFile {
    /// etcd client URLs, e.g. `http://10.0.0.1:2379` (`https://` for TLS).
    #[serde(default)]
    pub etcd: Vec<String>,
    pub prefix: Option<String>,
    /// etcd user name: a reference (`env:NAME` or `file:PATH`).
    pub user: Option<String>,
    /// etcd password: a reference (`env:NAME` or `file:PATH`).
    pub password: Option<String>,
    /// CA certificate (PEM) that etcd's server certificates chain to.
    pub ca: Option<PathBuf>,
    /// Client certificate and key (PEM) for etcd's client certificate authentication.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// This relay's name in the fleet [default: host name and UDP port].
    pub name: Option<String>,
    /// Addresses nodes reach this relay at (`host:port`) [default: the listen address].
    #[serde(default)]
    pub advertise: Vec<String>,
    /// e.g. `"10s"`.
    pub lease_ttl: Option<String>,
}

/// The `cluster` flags of `postern-relay run` (and of the commands that change the shared
/// state: `ticket`, `identity`).
#[derive(Debug, Default, Clone, Args)]
pub struct ClusterArgs {
    /// etcd client URL holding the fleet's shared state, e.g. `http://10.0.0.1:2379`
    /// (repeatable). Without one the relay keeps its state in its state directory.
    #[arg(long = "etcd", value_name = "URL")]
    pub etcd: Vec<String>,
    /// Key prefix in etcd [default: /postern].
    #[arg(long)]
    pub etcd_prefix: Option<String>,
    /// etcd user name, as a reference: `env:NAME` or `file:PATH`.
    #[arg(long, value_name = "env:NAME|file:PATH")]
    pub etcd_user: Option<String>,
    /// etcd password, as a reference: `env:NAME` or `file:PATH`.
    #[arg(long, value_name = "env:NAME|file:PATH")]
    pub etcd_password: Option<String>,
    /// CA certificate (PEM) of etcd's TLS server certificates.
    #[arg(long)]
    pub etcd_ca: Option<PathBuf>,
    /// Client certificate (PEM) for etcd.
    #[arg(long, requires = "etcd_key")]
    pub etcd_cert: Option<PathBuf>,
    /// Client key (PEM) for etcd.
    #[arg(long, requires = "etcd_cert")]
    pub etcd_key: Option<PathBuf>,
    /// This relay's name in the fleet [default: host name and UDP port].
    #[arg(long)]
    pub cluster_name: Option<String>,
    /// Address nodes reach this relay at, `host:port` (repeatable) [default: the listen
    /// address].
    #[arg(long, value_name = "HOST:PORT")]
    pub advertise: Vec<String>,
    /// Time to live of this relay's membership lease in etcd, e.g. `10s` [default: 10s].
    #[arg(long, value_parser = postern_net::runtime::duration::parse_duration)]
    pub etcd_lease_ttl: Option<Duration>,
}

/// A resolved `cluster`: the relay keeps its shared state in etcd.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    pub endpoints: Vec<String>,
    /// Ends without `/`; keys are `<prefix>/tickets/<id>` and so on.
    pub prefix: String,
    pub user: Option<SecretRef>,
    pub password: Option<SecretRef>,
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub name: Option<String>,
    pub advertise: Vec<String>,
    pub lease_ttl: Duration,
}

impl ClusterArgs {
    /// Merges the flags over the file's table; `None` when no etcd endpoint is configured
    /// (the embedded state, as before).
    pub fn resolve(self, file: Option<ClusterFile>) -> Result<Option<ClusterConfig>, String> {
        let file = file.unwrap_or_default();
        let endpoints = if self.etcd.is_empty() {
            file.etcd
        } else {
            self.etcd
        };
        if endpoints.is_empty() {
            let set = self.etcd_prefix.is_some()
                || self.etcd_user.is_some()
                || self.etcd_password.is_some()
                || file.prefix.is_some()
                || file.user.is_some()
                || file.password.is_some();
            if set {
                return Err("cluster: etcd settings are given but no etcd endpoint".into());
            }
            return Ok(None);
        }
        for e in &endpoints {
            if !(e.starts_with("http://") || e.starts_with("https://")) {
                return Err(format!(
                    "cluster.etcd: {e:?} is not an etcd client URL (http://HOST:PORT or https://HOST:PORT)"
                ));
            }
        }
        let prefix = self
            .etcd_prefix
            .or(file.prefix)
            .unwrap_or_else(|| DEFAULT_PREFIX.into());
        let prefix = prefix.trim_end_matches('/').to_owned();
        if !prefix.starts_with('/') {
            return Err(format!(
                "cluster.prefix: {prefix:?} must start with `/`, e.g. /postern"
            ));
        }
        let lease_ttl = match (self.etcd_lease_ttl, file.lease_ttl) {
            (Some(d), _) => d,
            (None, Some(text)) => postern_net::runtime::duration::parse_duration(&text)
                .map_err(|e| format!("cluster.lease-ttl: {e}"))?,
            (None, None) => DEFAULT_LEASE_TTL,
        };
        if lease_ttl < Duration::from_secs(1) {
            return Err("cluster.lease-ttl: at least 1s".into());
        }
        let user = self.etcd_user.or(file.user).map(SecretRef);
        let password = self.etcd_password.or(file.password).map(SecretRef);
        if user.is_some() != password.is_some() {
            return Err("cluster: etcd user and password go together".into());
        }
        for (key, r) in [("user", &user), ("password", &password)] {
            if let Some(r) = r {
                if !r.is_reference() {
                    return Err(format!(
                        "cluster.{key}: must be a reference to the secret (`env:NAME` or \
                         `file:PATH`); plaintext values are not accepted"
                    ));
                }
            }
        }
        let cert = self.etcd_cert.or(file.cert);
        let key = self.etcd_key.or(file.key);
        if cert.is_some() != key.is_some() {
            return Err("cluster: the etcd client cert and key go together".into());
        }
        Ok(Some(ClusterConfig {
            endpoints,
            prefix,
            user,
            password,
            ca: self.etcd_ca.or(file.ca),
            cert,
            key,
            name: self.cluster_name.or(file.name),
            advertise: if self.advertise.is_empty() {
                file.advertise
            } else {
                self.advertise
            },
            lease_ttl,
        }))
    }
}

/// A reference to a secret: `env:NAME` or `file:PATH`. `Debug` never shows what it points
/// to, only the reference.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretRef(String);

impl std::fmt::Debug for SecretRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.is_reference() {
            write!(f, "SecretRef({:?})", self.0)
        } else {
            f.write_str("SecretRef(<not a reference>)")
        }
    }
}

impl SecretRef {
    pub fn new(reference: impl Into<String>) -> Self {
        Self(reference.into())
    }

    fn is_reference(&self) -> bool {
        self.0.starts_with("env:") || self.0.starts_with("file:")
    }

    /// Reads the secret; `key` names the config key in errors (which never hold the secret).
    pub fn resolve(&self, key: &str) -> Result<Zeroizing<String>, String> {
        if let Some(name) = self.0.strip_prefix("env:") {
            match std::env::var(name) {
                Ok(v) if !v.is_empty() => Ok(Zeroizing::new(v)),
                Ok(_) => Err(format!("{key}: environment variable {name} is empty")),
                Err(_) => Err(format!("{key}: environment variable {name} is not set")),
            }
        } else if let Some(path) = self.0.strip_prefix("file:") {
            let mut text = Zeroizing::new(
                std::fs::read_to_string(path)
                    .map_err(|e| format!("{key}: cannot read file {path:?}: {e}"))?,
            );
            let len = text.trim_end_matches(['\r', '\n']).len();
            text.truncate(len);
            if text.is_empty() {
                return Err(format!("{key}: file {path:?} is empty"));
            }
            Ok(text)
        } else {
            Err(format!(
                "{key}: must be a reference to the secret (`env:NAME` or `file:PATH`)"
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_endpoint_means_the_embedded_state() {
        assert!(ClusterArgs::default()
            .resolve(None)
            .expect("empty")
            .is_none());
        let e = ClusterArgs {
            etcd_prefix: Some("/x".into()),
            ..Default::default()
        }
        .resolve(None)
        .expect_err("prefix without endpoint");
        assert!(e.contains("no etcd endpoint"), "{e}");
    }

    #[test]
    fn flags_win_over_the_file_and_the_prefix_is_normalised() {
        let file: ClusterFile = toml::from_str(
            "etcd = [\"http://127.0.0.1:1\"]\nprefix = \"/fleet/\"\nlease-ttl = \"3s\"",
        )
        .expect("toml");
        let c = ClusterArgs::default()
            .resolve(Some(file.clone()))
            .expect("file")
            .expect("cluster");
        assert_eq!(
            (c.endpoints.as_slice(), c.prefix.as_str(), c.lease_ttl),
            (
                &["http://127.0.0.1:1".to_string()][..],
                "/fleet",
                Duration::from_secs(3)
            )
        );
        let c = ClusterArgs {
            etcd: vec!["https://10.0.0.1:2379".into()],
            ..Default::default()
        }
        .resolve(Some(file))
        .expect("flags")
        .expect("cluster");
        assert_eq!(c.endpoints, vec!["https://10.0.0.1:2379".to_string()]);
        let e = ClusterArgs {
            etcd: vec!["10.0.0.1:2379".into()],
            ..Default::default()
        }
        .resolve(None)
        .expect_err("no scheme");
        assert!(e.contains("not an etcd client URL"), "{e}");
    }

    #[test]
    fn plaintext_credentials_are_refused_without_being_echoed() {
        let file: ClusterFile = toml::from_str(
            "etcd = [\"http://127.0.0.1:1\"]\nuser = \"root\"\npassword = \"hunter2-secret\"",
        )
        .expect("toml");
        let e = ClusterArgs::default()
            .resolve(Some(file))
            .expect_err("plaintext");
        assert!(e.contains("reference"), "{e}");
        assert!(!e.contains("hunter2-secret") && !e.contains("root"), "{e}");
        let r = SecretRef::new("hunter2-secret");
        assert!(!format!("{r:?}").contains("hunter2"));
    }

    #[test]
    fn references_resolve_from_env_and_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("pw");
        std::fs::write(&path, "s3cret\n").expect("write");
        let r = SecretRef::new(format!("file:{}", path.display()));
        assert_eq!(r.resolve("password").expect("file").as_str(), "s3cret");
        let e = SecretRef::new("env:POSTERN_TEST_SURELY_UNSET_VAR")
            .resolve("user")
            .expect_err("unset");
        assert!(e.contains("not set"), "{e}");
    }
}
