//! The real clients the tests drive: Python with the `influxdb` and `influxdb-client`
//! libraries, and the `influx` CLI.

use std::net::SocketAddr;

/// The Python interpreter of the test venv (made by scripts/test.sh), with the `influxdb` and
/// `influxdb-client` libraries.
pub fn python() -> std::path::PathBuf {
    if let Some(p) = std::env::var_os("POSTERN_PYTHON") {
        return p.into();
    }
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
    assert!(
        p.exists(),
        "no Python venv at {}: run scripts/test.sh (it creates it) or set POSTERN_PYTHON",
        p.display()
    );
    p
}

/// Runs a Python snippet with the venv's interpreter; returns stdout, failing on a non-zero exit.
pub async fn run_python(code: &str, args: &[&str]) -> String {
    let out = tokio::process::Command::new(python())
        .arg("-c")
        .arg(code)
        .args(args)
        .output()
        .await
        .expect("run python");
    assert!(
        out.status.success(),
        "python failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs the real `influx` CLI (1.x) against `addr`; returns stdout, failing on a non-zero exit.
pub async fn influx_cli(addr: SocketAddr, args: &[&str]) -> String {
    let out = tokio::process::Command::new("influx")
        .args([
            "-host",
            &addr.ip().to_string(),
            "-port",
            &addr.port().to_string(),
        ])
        .args(args)
        .output()
        .await
        .expect("run influx CLI (apt-get install influxdb-client)");
    assert!(
        out.status.success(),
        "influx {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
