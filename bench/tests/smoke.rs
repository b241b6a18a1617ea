//! Runs every `--quick` scenario in-process and checks that it completes with verified bytes
//! and no errors. No timing is asserted.

use postern_bench::cluster::RelayMode;
use postern_bench::{bulk, progress, Plan};
use std::path::PathBuf;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quick_scenarios_complete_without_errors() {
    progress::set_quiet(true);
    let mode = RelayMode::Child(PathBuf::from(env!("CARGO_BIN_EXE_postern-bench")));
    let plan = Plan::all(true, false);
    let r = postern_bench::run(&plan, &mode, true, "smoke")
        .await
        .expect("quick run");
    assert_eq!(r.errors(), 0, "{}", r.tables());

    let b = r.bulk.as_ref().expect("bulk ran");
    for row in &b.rows {
        let runs = b.options.repeat as u64;
        assert_eq!(
            row.verified_streams,
            row.streams as u64 * runs,
            "{} x{}: every stream verified at the sink",
            row.system,
            row.streams
        );
        assert!(row.gbps > 0.0);
    }
    assert!(
        b.relay_stats.forwarded_bytes
            > b.rows
                .iter()
                .filter(|r| r.system == "postern")
                .map(|r| r.total_bytes)
                .sum::<u64>(),
        "postern's bytes went through the relay's forwarder"
    );
    let rr = r.rr.as_ref().expect("rr ran");
    for row in &rr.rows {
        assert_eq!(
            row.sent, row.received,
            "{}: every request answered",
            row.system
        );
    }
    let open = r.open.as_ref().expect("open ran");
    for row in &open.rows {
        assert_eq!(row.opened, open.options.count as u64, "{}", row.system);
    }
    let http = r.http.as_ref().expect("http ran");
    for row in &http.rows {
        assert_eq!(row.requests, http.options.requests as u64, "{}", row.system);
    }
    let f = r.fleet.first().expect("fleet ran");
    assert_eq!(f.routes, f.options.inlets * f.options.outlets);
    assert_eq!(f.relay_stats.routes_granted as usize, f.routes);
    assert!(!r.tables().is_empty());
    serde_json::to_string(&r).expect("report serializes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_with_the_relay_in_process() {
    progress::set_quiet(true);
    let plan = Plan {
        bulk: Some(bulk::BulkOptions {
            streams: vec![4],
            total_bytes: 2 << 20,
            ..bulk::BulkOptions::quick()
        }),
        ..Plan::default()
    };
    let r = postern_bench::run(&plan, &RelayMode::InProcess, true, "smoke")
        .await
        .expect("quick bulk");
    assert_eq!(r.errors(), 0, "{}", r.tables());
    let b = r.bulk.expect("bulk ran");
    assert!(b.rows.iter().all(|row| row.verified_streams == 4));
}

#[test]
fn the_binary_runs_a_quick_scenario_and_writes_json() {
    let dir = tempfile::tempdir().expect("tempdir");
    let json = dir.path().join("bulk.json");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_postern-bench"))
        .args(["--quick", "--json"])
        .arg(&json)
        .args(["bulk", "--streams", "2", "--total-mib", "1"])
        .output()
        .expect("run postern-bench");
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("| 2 | postern |"));
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("json written"))
            .expect("valid json");
    assert_eq!(v["bulk"]["rows"][1]["verified_streams"], 2);
}
