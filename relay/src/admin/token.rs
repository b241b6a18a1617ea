//! The admin API's bearer token: random, made at the relay's first start, kept in the state
//! directory with mode 0600 so only the relay's user (and root) can use the API.

use postern_net::runtime::files::{self, FileError};
use postern_proto::secret::Secret;
use std::fmt;
use std::path::{Path, PathBuf};
use zeroize::Zeroizing;

/// Name of the token file inside the relay's state directory.
pub const TOKEN_FILE: &str = "admin.token";

/// Why the token could not be read or made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    #[error(transparent)]
    File(#[from] FileError),
    #[error(
        "admin token file {0} is empty or not a token (delete it to have the relay make a new one)"
    )]
    Malformed(PathBuf),
}

/// A bearer token. Its `Debug` hides the value, so it cannot reach logs by accident.
#[derive(Clone)]
pub struct AdminToken {
    value: Secret,
}

impl fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AdminToken(***)")
    }
}

impl AdminToken {
    /// The token as sent in `Authorization: Bearer ...`.
    pub fn expose(&self) -> &str {
        self.value.expose()
    }

    /// Whether `presented` is this token. Compares SHA-256 digests in constant time, so neither
    /// the position of the first difference nor the token's length shows in the timing.
    pub fn matches(&self, presented: &str) -> bool {
        use postern_proto::ticket::{constant_time_eq, secret_hash};
        constant_time_eq(&secret_hash(presented), &secret_hash(self.value.expose()))
    }

    /// Reads a token file.
    pub fn load(path: &Path) -> Result<Self, TokenError> {
        let text = Zeroizing::new(files::read(path)?);
        let value = text.trim();
        if value.len() < 16 || !value.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(TokenError::Malformed(path.to_owned()));
        }
        Ok(Self {
            value: Secret::new(value),
        })
    }

    /// Reads the token file, or makes one (256 random bits, hex, mode 0600) if there is none.
    pub fn load_or_create(path: &Path) -> Result<Self, TokenError> {
        if path.exists() {
            warn_if_readable_by_others(path);
            return Self::load(path);
        }
        let value = Secret::new(hex::encode(rand::random::<[u8; 32]>()));
        files::write(path, value.expose().as_bytes(), true)?;
        tracing::info!(path = %path.display(), "made the admin API token");
        Ok(Self { value })
    }
}

#[cfg(unix)]
fn warn_if_readable_by_others(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path) {
        if meta.permissions().mode() & 0o077 != 0 {
            tracing::warn!(path = %path.display(), "the admin token file can be read by other users; chmod 600 it");
        }
    }
}

#[cfg(not(unix))]
fn warn_if_readable_by_others(_: &Path) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn made_once_private_and_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(TOKEN_FILE);
        let first = AdminToken::load_or_create(&path).expect("create");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let again = AdminToken::load_or_create(&path).expect("load");
        assert_eq!(first.expose(), again.expose());
        assert_eq!(first.expose().len(), 64);
        assert!(again.matches(first.expose()));
        assert!(!again.matches(""));
        assert!(!again.matches(&first.expose()[1..]));
        assert!(!format!("{first:?}").contains(first.expose()));
    }

    #[test]
    fn malformed_file_is_an_error_that_hides_the_content() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(TOKEN_FILE);
        std::fs::write(&path, "s3cr3t!").expect("write");
        let err = AdminToken::load_or_create(&path).expect_err("too short");
        assert!(!err.to_string().contains("s3cr3t"), "{err}");
        assert!(err.to_string().contains(TOKEN_FILE), "{err}");
    }
}
