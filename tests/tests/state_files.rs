//! State on disk is private: the real `postern-relay`, `postern-outlet` and `postern-inlet`
//! binaries, started on fresh state directories (and on directories an older install left open
//! to other users), keep every directory at mode 0700 and every file at 0600. Certificates
//! issued with `ca issue --out-dir` are meant to be handed out; only their key is private.
//!
//! The tests run the binaries next to this test executable; build them first with
//! `cargo build --bins` (scripts/test.sh does).

use postern_tests::kit::*;
use postern_tests::ports::{free_port, free_udp_addr};
use postern_tests::procs::{cli, Proc, RelayCa};
use postern_tests::traffic::{echo_round, echo_server};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

/// Every entry under `dir` (itself included) with its mode, directories first.
fn walk(dir: &Path) -> Vec<(PathBuf, bool, u32)> {
    let mut out = vec![(dir.to_owned(), true, mode(dir))];
    let mut i = 0;
    while i < out.len() {
        if out[i].1 {
            let d = out[i].0.clone();
            for e in std::fs::read_dir(&d).expect("read_dir") {
                let p = e.expect("entry").path();
                let is_dir = std::fs::symlink_metadata(&p).expect("meta").is_dir();
                let m = mode(&p);
                out.push((p, is_dir, m));
            }
        }
        i += 1;
    }
    out
}

/// Fails naming each entry under `dir` that is not private (directories 0700, everything else
/// 0600), and when `dir` holds fewer than `min_files` files (the walk must see the state).
fn assert_private(dir: &Path, min_files: usize) {
    let entries = walk(dir);
    let open: Vec<String> = entries
        .iter()
        .filter(|(_, is_dir, m)| *m != if *is_dir { 0o700 } else { 0o600 })
        .map(|(p, _, m)| format!("{} {m:o}", p.display()))
        .collect();
    assert!(
        open.is_empty(),
        "state open to other users under {}: {open:?}",
        dir.display()
    );
    let files = entries.iter().filter(|(_, d, _)| !d).count();
    assert!(
        files >= min_files,
        "{}: {files} files, expected at least {min_files}: {entries:?}",
        dir.display()
    );
}

const WARNING: &str = "the state directory was readable by other users";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_outlet_and_inlet_keep_their_state_private() {
    init_logging();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = |p: &str| dir.path().join(p).display().to_string();
    let relay_state = path("relay-state");
    let relay_addr = free_udp_addr().to_string();
    let relay_ca = RelayCa::init(&relay_state, &relay_addr).await;
    let outlet_ticket = relay_ca.ticket("echo-outlet").await;
    let inlet_ticket = relay_ca.ticket("echo-client").await;
    // A hand-issued certificate for sharing: the certificates may be read by others, the key
    // may not.
    let certs = dir.path().join("certs");
    cli(
        "postern-relay",
        &[
            "ca",
            "issue",
            "web.localhost",
            "--state-dir",
            &relay_state,
            "--out-dir",
            &certs.display().to_string(),
        ],
    )
    .await;
    assert_eq!(mode(&certs.join("web.localhost.key")), 0o600);
    assert_eq!(mode(&certs.join("web.localhost.pem")), 0o644);
    assert_eq!(mode(&certs.join("ca.pem")), 0o644);
    assert_eq!(mode(&certs), 0o700, "the directory holds a private key");

    // An older install left the relay's directory open (0755, its CA certificate 0644): the
    // relay tightens it at start-up and says so.
    let relay_dir = Path::new(&relay_state);
    std::fs::set_permissions(relay_dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    std::fs::set_permissions(
        relay_dir.join("ca.pem"),
        std::fs::Permissions::from_mode(0o644),
    )
    .expect("chmod");
    let relay_ops = format!("127.0.0.1:{}", free_port());
    let admin_addr = format!("127.0.0.1:{}", free_port());
    let mut relay = Proc::spawn(
        dir.path(),
        "relay",
        "postern-relay",
        &[
            "run",
            "--state-dir",
            &relay_state,
            "--listen",
            &relay_addr,
            "--allow-register",
            "echo=role = \"echo-outlet\"",
            "--allow-route",
            "echo=role = \"echo-client\"",
            "--metrics-addr",
            &relay_ops,
            "--admin-addr",
            &admin_addr,
            "--drain-timeout",
            "1s",
        ],
    );
    relay.wait_ready(relay_ops.parse().expect("addr")).await;

    let (echo, _e) = echo_server().await;
    let outlet_ops = format!("127.0.0.1:{}", free_port());
    let mut outlet = Proc::spawn(
        dir.path(),
        "outlet",
        "postern-outlet",
        &[
            "run",
            "--ticket",
            &outlet_ticket,
            "--name",
            "outlet-a",
            "--state-dir",
            &path("outlet-state"),
            "--service",
            &format!("echo={echo},allow=role = \"echo-client\""),
            "--metrics-addr",
            &outlet_ops,
            "--drain-timeout",
            "1s",
        ],
    );
    outlet.wait_ready(outlet_ops.parse().expect("addr")).await;

    // The inlet's directory was made by hand, open to everyone, before it enrolled.
    let inlet_state = dir.path().join("inlet-state");
    std::fs::create_dir(&inlet_state).expect("mkdir");
    std::fs::set_permissions(&inlet_state, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let listen = format!("127.0.0.1:{}", free_port());
    let inlet_ops = format!("127.0.0.1:{}", free_port());
    let mut inlet = Proc::spawn(
        dir.path(),
        "inlet",
        "postern-inlet",
        &[
            "run",
            "--ticket",
            &inlet_ticket,
            "--name",
            "inlet-a",
            "--state-dir",
            &inlet_state.display().to_string(),
            "--service",
            &format!("echo={listen}"),
            "--metrics-addr",
            &inlet_ops,
            "--drain-timeout",
            "1s",
        ],
    );
    inlet.wait_ready(inlet_ops.parse().expect("addr")).await;

    // Traffic flows, so every node has written what it writes at start and enrollment.
    let (sent, back) = echo_round(listen.parse().expect("addr"), 4096).await;
    assert_eq!(sent, back);

    // relay: ca.key, ca.pem, relay.key, relay.pem, reset.key, admin.token, 2 tickets, 2
    // identities; outlet and inlet: node.key, node.pem, ca.pem, node.json.
    assert_private(relay_dir, 10);
    assert_private(Path::new(&path("outlet-state")), 4);
    assert_private(&inlet_state, 4);
    assert_eq!(
        relay.log().matches(WARNING).count(),
        1,
        "the relay says once that it tightened its directory:\n{}",
        relay.log()
    );
    assert_eq!(
        inlet.log().matches(WARNING).count(),
        1,
        "the inlet says once that it tightened its directory:\n{}",
        inlet.log()
    );
    assert_eq!(
        outlet.log().matches(WARNING).count(),
        0,
        "the outlet's directory was private from the start:\n{}",
        outlet.log()
    );
}
