//! Small file helpers shared by the binaries: private files and directories, TOML configs.
//!
//! State directories hold private keys, lease credentials and enrollment records, so they are
//! kept to their owner: directories 0700, files 0600. Only artefacts written for sharing (a
//! certificate exported to a path the user chose) are 0644.

use serde::de::DeserializeOwned;
use std::io::Write;
use std::path::{Path, PathBuf};

/// A file operation that failed, naming the file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FileError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config {path}: {message}")]
    Config { path: PathBuf, message: String },
}

/// Reads a whole text file.
pub fn read(path: &Path) -> Result<String, FileError> {
    std::fs::read_to_string(path).map_err(|source| FileError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Writes a file atomically (temp file + rename), with mode 0600 when `private` (0644 only for
/// artefacts meant to be shared). Missing parent directories are made with mode 0700: a new
/// file is never exposed by the directory it lands in.
pub fn write(path: &Path, contents: &[u8], private: bool) -> Result<(), FileError> {
    let err = |source| FileError::Write {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        create_dirs(dir).map_err(err)?;
    }
    let tmp = path.with_extension("tmp");
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(if private { 0o600 } else { 0o644 });
    }
    let mut f = opts.open(&tmp).map_err(err)?;
    f.write_all(contents).map_err(err)?;
    f.sync_all().map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)?;
    Ok(())
}

/// Creates `dir` and its missing parents with mode 0700 (an existing directory is left as is).
fn create_dirs(dir: &Path) -> std::io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(dir)
}

/// Makes `dir` a private state directory: creates it (mode 0700) if missing; if it exists and
/// it, or anything under it, is open to other users (an install from before state was kept
/// private, a directory made by hand), tightens directories to 0700 and files to 0600 and says
/// so once in the log. Symbolic links are not followed. Returns how many entries it tightened.
pub fn private_dir(dir: &Path) -> Result<usize, FileError> {
    let err = |source| FileError::Write {
        path: dir.to_owned(),
        source,
    };
    if !dir.exists() {
        create_dirs(dir).map_err(err)?;
        return Ok(0);
    }
    let tightened = tighten_tree(dir).map_err(err)?;
    if tightened > 0 {
        tracing::warn!(
            dir = %dir.display(),
            entries = tightened,
            "the state directory was readable by other users; tightened it to mode 0700 and its files to 0600"
        );
    }
    Ok(tightened)
}

#[cfg(unix)]
fn tighten_tree(dir: &Path) -> std::io::Result<usize> {
    let mut count = 0;
    let mut pending = vec![dir.to_owned()];
    while let Some(d) = pending.pop() {
        count += usize::from(tighten(&d, &std::fs::symlink_metadata(&d)?)?);
        for entry in std::fs::read_dir(&d)? {
            let entry = entry?;
            let meta = entry.metadata()?;
            if meta.is_dir() {
                pending.push(entry.path());
            } else if meta.is_file() {
                count += usize::from(tighten(&entry.path(), &meta)?);
            }
        }
    }
    Ok(count)
}

#[cfg(not(unix))]
fn tighten_tree(_: &Path) -> std::io::Result<usize> {
    Ok(0)
}

/// Clears the group and other bits of a directory (to 0700) or a regular file (to 0600);
/// true when it had any.
#[cfg(unix)]
fn tighten(path: &Path, meta: &std::fs::Metadata) -> std::io::Result<bool> {
    use std::os::unix::fs::PermissionsExt;
    if meta.permissions().mode() & 0o077 == 0 {
        return Ok(false);
    }
    let mode = if meta.is_dir() { 0o700 } else { 0o600 };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(true)
}

/// Makes sure the file at `path` exists and is private (mode 0600): creates it empty with that
/// mode, or tightens an existing one. For files another library opens itself (the redb stores):
/// called before it does, the file never exists with wider permissions.
pub fn private_file(path: &Path) -> Result<(), FileError> {
    let err = |source| FileError::Write {
        path: path.to_owned(),
        source,
    };
    let mut opts = std::fs::OpenOptions::new();
    opts.append(true).create(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let file = opts.open(path).map_err(err)?;
    #[cfg(unix)]
    {
        let meta = file.metadata().map_err(err)?;
        tighten(path, &meta).map_err(err)?;
    }
    drop(file);
    Ok(())
}

/// Parses a TOML config file; errors name the file and the offending key and line.
pub fn load_toml<T: DeserializeOwned>(path: &Path) -> Result<T, FileError> {
    let text = read(path)?;
    toml::from_str(&text).map_err(|e| FileError::Config {
        path: path.to_owned(),
        message: e.to_string(),
    })
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(path: &Path) -> u32 {
        std::fs::symlink_metadata(path)
            .expect("metadata")
            .permissions()
            .mode()
            & 0o777
    }

    #[test]
    fn write_makes_missing_parents_private() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("a/b/secret.json");
        write(&file, b"{}", true).expect("write");
        assert_eq!(mode(&dir.path().join("a")), 0o700);
        assert_eq!(mode(&dir.path().join("a/b")), 0o700);
        assert_eq!(mode(&file), 0o600);
        let shared = dir.path().join("c/ca.pem");
        write(&shared, b"pem", false).expect("write");
        assert_eq!(mode(&dir.path().join("c")), 0o700);
        assert_eq!(mode(&shared), 0o644);
    }

    #[test]
    fn private_dir_creates_0700_and_tightens_an_open_tree() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fresh = dir.path().join("fresh/state");
        assert_eq!(private_dir(&fresh).expect("create"), 0);
        assert_eq!(mode(&fresh), 0o700);

        let old = dir.path().join("old");
        std::fs::create_dir_all(old.join("identities")).expect("mkdir");
        std::fs::write(old.join("node.json"), "{}").expect("write");
        std::fs::write(old.join("identities/a.json"), "{}").expect("write");
        std::fs::set_permissions(&old, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        std::fs::set_permissions(
            old.join("node.json"),
            std::fs::Permissions::from_mode(0o644),
        )
        .expect("chmod");
        std::fs::set_permissions(
            old.join("identities"),
            std::fs::Permissions::from_mode(0o755),
        )
        .expect("chmod");
        std::fs::set_permissions(
            old.join("identities/a.json"),
            std::fs::Permissions::from_mode(0o640),
        )
        .expect("chmod");
        assert_eq!(private_dir(&old).expect("tighten"), 4);
        assert_eq!(mode(&old), 0o700);
        assert_eq!(mode(&old.join("identities")), 0o700);
        assert_eq!(mode(&old.join("node.json")), 0o600);
        assert_eq!(mode(&old.join("identities/a.json")), 0o600);
        // Already private: nothing more to do, no second warning.
        assert_eq!(private_dir(&old).expect("again"), 0);
    }

    #[test]
    fn private_file_creates_and_tightens() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("store.redb");
        private_file(&path).expect("create");
        assert_eq!(mode(&path), 0o600);
        std::fs::write(&path, "data").expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        private_file(&path).expect("tighten");
        assert_eq!(mode(&path), 0o600);
        assert_eq!(
            std::fs::read(&path).expect("read"),
            b"data",
            "contents are kept"
        );
    }
}
/// Where a node keeps its state (identity, leases) unless `--state-dir` says otherwise, so that
/// `enroll` and `run` agree without being told, whatever directory they run from:
///
/// 1. `./postern-<component>-state` when it already exists in the working directory (where
///    earlier versions put it, so an existing install keeps its identity);
/// 2. `/var/lib/postern-<component>` when running as root;
/// 3. `$XDG_STATE_HOME/postern-<component>`, or `~/.local/state/postern-<component>`;
/// 4. `./postern-<component>-state` when there is no home directory.
pub fn default_state_dir(component: &str) -> PathBuf {
    let legacy = PathBuf::from(format!("postern-{component}-state"));
    if legacy.is_dir() {
        return legacy;
    }
    state_dir_for(
        component,
        is_root(),
        std::env::var_os("XDG_STATE_HOME").map(PathBuf::from),
        std::env::var_os("HOME").map(PathBuf::from),
    )
    .unwrap_or(legacy)
}

/// [`default_state_dir`] without the legacy check, from the facts it depends on.
fn state_dir_for(
    component: &str,
    root: bool,
    xdg_state_home: Option<PathBuf>,
    home: Option<PathBuf>,
) -> Option<PathBuf> {
    let leaf = format!("postern-{component}");
    if root {
        return Some(PathBuf::from("/var/lib").join(leaf));
    }
    if let Some(x) = xdg_state_home.filter(|p| p.is_absolute()) {
        return Some(x.join(leaf));
    }
    home.filter(|p| p.is_absolute())
        .map(|h| h.join(".local/state").join(leaf))
}

#[cfg(unix)]
fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

#[cfg(not(unix))]
fn is_root() -> bool {
    false
}
