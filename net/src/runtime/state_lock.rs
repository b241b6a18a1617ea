//! One process per node state directory. Two inlets (or outlets) on one identity knock each
//! other off the relay every few milliseconds ("replaced by a newer connection"); the second
//! is refused at start instead, with the first one's pid.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

/// The lock file's name in the state directory; it holds the owner's pid.
pub const LOCK_FILE: &str = "lock";

/// Why the state directory could not be locked.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LockError {
    #[error(
        "{dir} is in use by another postern-{role} ({holder}): two processes on one identity \
         knock each other off the relay. Stop that one, or give this one its own --state-dir \
         (and enroll it with its own ticket)"
    )]
    Held {
        dir: PathBuf,
        role: String,
        holder: String,
    },
    #[error(transparent)]
    Dir(#[from] crate::runtime::files::FileError),
    #[error("cannot lock the state directory ({path}): {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Held while the process runs: the lock goes with the open file (also when the process dies).
#[derive(Debug)]
pub struct StateLock {
    _file: File,
}

/// Locks `dir` (made, private, if missing) for this process, or says which process holds it.
pub fn lock(dir: &Path, role: &str) -> Result<StateLock, LockError> {
    let path = dir.join(LOCK_FILE);
    let io = |source| LockError::Io {
        path: path.clone(),
        source,
    };
    crate::runtime::files::private_dir(dir)?;
    let mut file = open(&path).map_err(io)?;
    if !try_lock(&file).map_err(io)? {
        let mut text = String::new();
        // Best effort: the holder writes its pid right after locking.
        let _ = file.read_to_string(&mut text);
        let holder = match text.trim().parse::<u32>() {
            Ok(pid) => format!("pid {pid}"),
            Err(_) => "a process that has not written its pid yet".to_owned(),
        };
        return Err(LockError::Held {
            dir: dir.to_owned(),
            role: role.to_owned(),
            holder,
        });
    }
    file.set_len(0).map_err(io)?;
    file.rewind().map_err(io)?;
    writeln!(file, "{}", std::process::id()).map_err(io)?;
    file.flush().map_err(io)?;
    Ok(StateLock { _file: file })
}

fn open(path: &Path) -> std::io::Result<File> {
    let mut opts = std::fs::OpenOptions::new();
    opts.read(true).write(true).create(true).truncate(false);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    opts.open(path)
}

/// Takes the exclusive lock without waiting: `false` when another process holds it.
#[cfg(unix)]
fn try_lock(file: &File) -> std::io::Result<bool> {
    use rustix::fs::{flock, FlockOperation};
    match flock(file, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(true),
        Err(e) if e == rustix::io::Errno::WOULDBLOCK => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Elsewhere no lock is taken (postern's nodes run on Unix).
#[cfg(not(unix))]
fn try_lock(_file: &File) -> std::io::Result<bool> {
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_names_the_holder_and_the_first_release_frees_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("state");
        let first = lock(&state, "inlet").expect("first lock");
        let e = lock(&state, "inlet").expect_err("second lock");
        let text = e.to_string();
        assert!(
            text.contains(&format!("pid {}", std::process::id())),
            "{text}"
        );
        assert!(text.contains("postern-inlet"), "{text}");
        drop(first);
        lock(&state, "inlet").expect("free again");
    }
}
