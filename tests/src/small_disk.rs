//! A small filesystem of its own for one process's directory, so that a test can fill it to "No
//! space left on device" and free it again without touching the machine's disks: a tmpfs of the
//! given size mounted over the directory in a private mount namespace (`unshare -m`) that the
//! process then runs in. The mount goes away with the process; nothing is left to clean up.
//!
//! Mounting needs root (CAP_SYS_ADMIN); [`available`] says why it cannot be done where it
//! cannot, so a test can skip with that message. From outside the namespace the directory is
//! reached through `/proc/PID/root` ([`seen_from`]), which resolves paths in the process's own
//! mounts.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use tokio::process::Command;

/// The mount, then the program: `sh -c SCRIPT sh SIZE DIR PROGRAM ARGS…`.
const SCRIPT: &str =
    r#"mount -t tmpfs -o "size=$1,mode=0700" postern-small-disk "$2" && shift 2 && exec "$@""#;

/// Whether a tmpfs can be mounted in a private mount namespace here (tried on a scratch
/// directory `probe`, created if missing); `Err` says why not.
pub async fn available(probe: &Path) -> Result<(), String> {
    std::fs::create_dir_all(probe).map_err(|e| format!("create {}: {e}", probe.display()))?;
    let out = command(probe, "64k", Path::new("true"), &[])
        .output()
        .await
        .map_err(|e| format!("cannot run unshare (util-linux): {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "cannot mount a tmpfs in a private mount namespace (needs root): {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// `program args` run with a tmpfs of `size` (as `mount -o size=` takes it: `4m`) mounted over
/// `dir`, which must exist. The program's pid is the returned command's: `unshare` and `sh`
/// exec it.
pub fn command(dir: &Path, size: &str, program: &Path, args: &[String]) -> Command {
    let mut cmd = Command::new("unshare");
    cmd.args([
        "--mount",
        "--propagation",
        "private",
        "--",
        "sh",
        "-c",
        SCRIPT,
        "sh",
    ])
    .arg(size)
    .arg(dir)
    .arg(program)
    .args(args);
    cmd
}

/// `dir` as process `pid` sees it (in its mount namespace), reachable from this one.
pub fn seen_from(pid: u32, dir: &Path) -> PathBuf {
    let rel = dir.strip_prefix("/").unwrap_or(dir);
    PathBuf::from(format!("/proc/{pid}/root")).join(rel)
}

/// The file [`fill`] writes in `dir`.
fn filler(dir: &Path) -> PathBuf {
    dir.join("postern-test-fill")
}

/// Writes a file into `dir` until its filesystem is full ("No space left on device"); returns
/// how many bytes it took. Any other error is returned. Call it again to take what was freed
/// since (it appends).
pub fn fill(dir: &Path) -> io::Result<u64> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(filler(dir))?;
    let chunk = vec![0u8; 4096];
    let mut written = 0u64;
    loop {
        match f.write(&chunk) {
            Ok(0) => return Ok(written),
            Ok(n) => written += n as u64,
            Err(e) if e.raw_os_error() == Some(28) => return Ok(written),
            Err(e) => return Err(e),
        }
    }
}

/// Frees what [`fill`] took.
pub fn free(dir: &Path) -> io::Result<()> {
    std::fs::remove_file(filler(dir))
}
