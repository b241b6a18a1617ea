//! The direct path through real NATs: the lab of tests/lab/natlab.sh (network namespaces, two
//! private networks behind routers masquerading with nftables, a relay on the public bridge)
//! and real `postern-relay`, `postern-outlet` and `postern-inlet` processes in it.
//!
//! Needs root, `ip netns` and `nft` (skipped, saying why, where they are missing); the binaries
//! are those next to this test executable (`cargo build --bins`, as scripts/test.sh does).

use postern_tests::natlab::{
    Lab, LabTunnel, LISTEN_PORT, OUTLET_IP, PACED_ECHO_CLIENT, ROUTER_B_IP,
};
use std::time::{Duration, Instant};

const MIB: u64 = 1024 * 1024;
const DIRECT: &str = "postern_inlet_routes_by_path{path=\"direct\"}";
const RELAYED: &str = "postern_inlet_routes_by_path{path=\"relayed\"}";
const FORWARDED: &str = "postern_relay_forwarded_bytes_total";

fn lab_or_skip() -> Option<Lab> {
    match Lab::up() {
        Ok(lab) => Some(lab),
        Err(why) => {
            println!("SKIPPED: cannot build the NAT lab ({why}); needs root, `ip netns` and nft");
            None
        }
    }
}

/// Runs the paced echo client in the inlet's namespace on its own task: `mib` MiB, `pause`
/// seconds between MiB. The task's output is "<bytes back> <sha256 matched>".
fn transfer(lab: &Lab, mib: u64, pause: &str) -> tokio::task::JoinHandle<(bool, String)> {
    let cmd = lab.command(
        "a",
        &postern_tests::clients::python(),
        &[
            "-c",
            PACED_ECHO_CLIENT,
            &LISTEN_PORT.to_string(),
            &(mib * MIB).to_string(),
            pause,
        ],
    );
    tokio::spawn(async move {
        let mut cmd = cmd;
        let out = cmd.output().await.expect("run client");
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    })
}

async fn finished_intact(t: tokio::task::JoinHandle<(bool, String)>, mib: u64, tunnel: &LabTunnel) {
    let (ok, out) = tokio::time::timeout(Duration::from_secs(180), t)
        .await
        .expect("transfer in time")
        .expect("client task");
    assert!(
        ok && out.trim() == format!("{} True", mib * MIB),
        "transfer through the tunnel: {out}\n{}",
        tunnel.logs()
    );
}

/// Polls metric `sample` in namespace `n` until `pred` holds.
async fn wait_metric(
    lab: &Lab,
    n: &str,
    sample: &str,
    within: Duration,
    tunnel: &LabTunnel,
    pred: impl Fn(f64) -> bool,
) -> f64 {
    let deadline = Instant::now() + within;
    loop {
        let v = lab.metric(n, sample).await;
        if let Some(v) = v.filter(|v| pred(*v)) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{sample} in {n} is {v:?} after {within:?}\n{}",
            tunnel.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Both nodes behind endpoint-independent NAT (plain masquerade): a transfer started on the
/// relay path finishes on the direct path, intact, with no reset; the relay's forwarded bytes
/// stop growing once the route is direct. 100 MiB each way, paced so that it spans the move.
/// The routers drop UDP between the private networks until at least 8 MiB each way crossed
/// the relay (the move can otherwise come within tens of milliseconds of route set-up), then
/// let it through: the inlet's next round finds the path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_two_endpoint_independent_nats_a_transfer_moves_direct() {
    postern_tests::kit::init_logging();
    let Some(lab) = lab_or_skip() else { return };
    lab.block_udp();
    let tunnel = LabTunnel::start(&lab, "auto", "auto").await;
    let t = transfer(&lab, 100, "0.15");
    let relayed = 2.0 * 8.0 * MIB as f64;
    wait_metric(
        &lab,
        "pub",
        FORWARDED,
        Duration::from_secs(30),
        &tunnel,
        |v| v >= relayed,
    )
    .await;
    assert_eq!(
        lab.metric("a", DIRECT).await,
        Some(0.0),
        "{}",
        tunnel.logs()
    );
    assert!(!t.is_finished(), "the transfer is still under way");
    lab.unblock_udp();
    wait_metric(&lab, "a", DIRECT, Duration::from_secs(30), &tunnel, |v| {
        v == 1.0
    })
    .await;
    let at_move = lab.metric("pub", FORWARDED).await.expect("relay metrics");
    assert!(
        !t.is_finished(),
        "the move came before the end of the transfer\n{}",
        tunnel.logs()
    );
    finished_intact(t, 100, &tunnel).await;
    let after = lab.metric("pub", FORWARDED).await.expect("relay metrics");
    assert!(
        after - at_move < 4.0 * MIB as f64,
        "the relay kept forwarding after the move: {at_move} then {after}\n{}",
        tunnel.logs()
    );
    assert!(
        tunnel.inlet.log().contains("went direct"),
        "the inlet logs the move:\n{}",
        tunnel.inlet.log()
    );
    let outlet_direct = lab
        .metric("b", "postern_outlet_routes_by_path{path=\"direct\"}")
        .await;
    assert_eq!(outlet_direct, Some(1.0), "{}", tunnel.logs());
}

/// The inlet and the outlet behind the same router (which does not hairpin: a packet to its
/// own public address from inside goes nowhere): they reach each other through the local
/// addresses they announced to the relay, and the route goes direct over the LAN.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_the_same_nat_the_nodes_go_direct_over_their_local_addresses() {
    postern_tests::kit::init_logging();
    let Some(lab) = lab_or_skip() else { return };
    let tunnel = LabTunnel::start_beside(&lab, "auto", "auto", "a2").await;
    let t = transfer(&lab, 16, "0.1");
    wait_metric(&lab, "a", DIRECT, Duration::from_secs(20), &tunnel, |v| {
        v == 1.0
    })
    .await;
    let at_move = lab.metric("pub", FORWARDED).await.expect("relay metrics");
    finished_intact(t, 16, &tunnel).await;
    let after = lab.metric("pub", FORWARDED).await.expect("relay metrics");
    assert!(
        after - at_move < 4.0 * MIB as f64,
        "the relay kept forwarding after the move: {at_move} then {after}\n{}",
        tunnel.logs()
    );
    assert!(
        tunnel.inlet.log().contains("10.1.0.3:"),
        "the inlet went direct to the outlet's LAN address:\n{}",
        tunnel.inlet.log()
    );
    let outlet_direct = lab
        .metric("a2", "postern_outlet_routes_by_path{path=\"direct\"}")
        .await;
    assert_eq!(outlet_direct, Some(1.0), "{}", tunnel.logs());
}

/// The inlet behind a NAT that maps each destination to a new random port (`masquerade
/// random,fully-random`): no direct path can be found; the connection works on the relay and
/// the metrics say so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_a_symmetric_nat_the_connection_stays_relayed_and_works() {
    postern_tests::kit::init_logging();
    let Some(lab) = lab_or_skip() else { return };
    lab.nat("a", "symmetric");
    let tunnel = LabTunnel::start(&lab, "auto", "auto").await;
    let t = transfer(&lab, 16, "0.2");
    let failed = "postern_inlet_direct_traversals_total{outcome=\"failed\"}";
    wait_metric(&lab, "a", failed, Duration::from_secs(20), &tunnel, |v| {
        v >= 1.0
    })
    .await;
    finished_intact(t, 16, &tunnel).await;
    assert_eq!(
        lab.metric("a", RELAYED).await,
        Some(1.0),
        "{}",
        tunnel.logs()
    );
    assert_eq!(lab.metric("a", DIRECT).await, Some(0.0));
    let forwarded = lab.metric("pub", FORWARDED).await.expect("relay metrics");
    assert!(forwarded > 2.0 * 16.0 * MIB as f64, "{forwarded}");
}

/// The routers drop UDP between the two private networks: the route stays relayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_udp_between_the_networks_dropped_the_route_stays_relayed() {
    postern_tests::kit::init_logging();
    let Some(lab) = lab_or_skip() else { return };
    lab.block_udp();
    let tunnel = LabTunnel::start(&lab, "auto", "auto").await;
    let t = transfer(&lab, 16, "0.2");
    let failed = "postern_inlet_direct_traversals_total{outcome=\"failed\"}";
    wait_metric(&lab, "a", failed, Duration::from_secs(20), &tunnel, |v| {
        v >= 1.0
    })
    .await;
    finished_intact(t, 16, &tunnel).await;
    assert_eq!(
        lab.metric("a", RELAYED).await,
        Some(1.0),
        "{}",
        tunnel.logs()
    );
    let ok = "postern_inlet_direct_traversals_total{outcome=\"ok\"}";
    assert_eq!(lab.metric("a", ok).await, Some(0.0));
}

/// `direct = "never"` on the outlet: where a direct path exists (two EIM NATs), the route
/// still never leaves the relay, and the outlet answers no probe.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_on_the_outlet_keeps_the_route_on_the_relay() {
    postern_tests::kit::init_logging();
    let Some(lab) = lab_or_skip() else { return };
    let tunnel = LabTunnel::start(&lab, "auto", "never").await;
    let t = transfer(&lab, 16, "0.2");
    let failed = "postern_inlet_direct_traversals_total{outcome=\"failed\"}";
    wait_metric(&lab, "a", failed, Duration::from_secs(20), &tunnel, |v| {
        v >= 1.0
    })
    .await;
    finished_intact(t, 16, &tunnel).await;
    assert_eq!(
        lab.metric("a", RELAYED).await,
        Some(1.0),
        "{}",
        tunnel.logs()
    );
    let answered = lab
        .metric("b", "postern_outlet_direct_probes_sent_total")
        .await;
    assert_eq!(answered, Some(0.0), "{}", tunnel.logs());
    let forwarded = lab.metric("pub", FORWARDED).await.expect("relay metrics");
    assert!(forwarded > 2.0 * 16.0 * MIB as f64, "{forwarded}");
}

/// Polls the relay's admin API (through `postern-relay status --json`) until it shows the
/// route `direct` or not, then checks the text `status` says the same.
async fn relay_shows(lab: &Lab, tunnel: &LabTunnel, direct: bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let shown = tunnel.relay_shows_direct(lab).await;
        if shown == Some(direct) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the relay's admin API shows direct = {shown:?}, not {direct}: {}\n{}",
            tunnel.relay_status(lab, true).await.1,
            tunnel.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (ok, text) = tunnel.relay_status(lab, false).await;
    let path = if direct { "  direct  " } else { "  relayed  " };
    let route = text
        .lines()
        .find(|l| l.contains("inlet-lab -> outlet-lab"))
        .unwrap_or_else(|| panic!("no route in `postern-relay status`:\n{text}"));
    assert!(ok && route.contains(path), "{route}");
}

/// After going direct, the routers start dropping UDP between the networks (a NAT rebinding
/// or a firewall change mid-transfer): the direct path goes quiet, the connection moves back
/// to the relay by itself, and the transfer finishes intact. The relay's status and admin API
/// show the route direct, then relayed again (the inlet reports each move).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_direct_path_goes_quiet_the_connection_falls_back_to_the_relay() {
    postern_tests::kit::init_logging();
    let Some(lab) = lab_or_skip() else { return };
    let tunnel = LabTunnel::start(&lab, "auto", "auto").await;
    let t = transfer(&lab, 40, "0.25");
    wait_metric(&lab, "a", DIRECT, Duration::from_secs(20), &tunnel, |v| {
        v == 1.0
    })
    .await;
    relay_shows(&lab, &tunnel, true).await;
    lab.block_udp();
    let back = "postern_inlet_path_moves_total{to=\"relayed\"}";
    wait_metric(&lab, "a", back, Duration::from_secs(15), &tunnel, |v| {
        v >= 1.0
    })
    .await;
    relay_shows(&lab, &tunnel, false).await;
    let at_fallback = lab.metric("pub", FORWARDED).await.expect("relay metrics");
    finished_intact(t, 40, &tunnel).await;
    let after = lab.metric("pub", FORWARDED).await.expect("relay metrics");
    assert!(
        after - at_fallback > MIB as f64,
        "the rest of the transfer crossed the relay: {at_fallback} then {after}"
    );
    assert!(
        tunnel.inlet.log().contains("back on the relay"),
        "the inlet logs the fall-back:\n{}",
        tunnel.inlet.log()
    );
}

/// After the route went direct, the relay is killed (SIGKILL: no goodbye): the transfer under
/// way finishes intact over the direct path, although both nodes lose their control
/// connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_going_direct_a_transfer_outlives_the_relay() {
    postern_tests::kit::init_logging();
    let Some(lab) = lab_or_skip() else { return };
    let mut tunnel = LabTunnel::start(&lab, "auto", "auto").await;
    let t = transfer(&lab, 40, "0.25");
    wait_metric(&lab, "a", DIRECT, Duration::from_secs(20), &tunnel, |v| {
        v == 1.0
    })
    .await;
    tunnel.relay.child.start_kill().expect("kill relay");
    // Both nodes notice (control connections time out) while the transfer goes on.
    let lost = "postern_inlet_relay_connected";
    wait_metric(&lab, "a", lost, Duration::from_secs(15), &tunnel, |v| {
        v == 0.0
    })
    .await;
    finished_intact(t, 40, &tunnel).await;
    assert!(
        tunnel
            .inlet
            .log()
            .contains("routes running direct carry on"),
        "{}",
        tunnel.logs()
    );
}

/// After going direct, router A rebinds mid-transfer: the inlet's packets to the outlet's
/// network leave from a new public port (its mapping towards the relay stays). The outlet
/// takes direct packets only from the address it verified, and router B lets nothing in from
/// the new port, so the direct path goes quiet: the connection falls back to the relay (or,
/// where a later round finds the new mapping, goes direct again), no stream fails and the
/// SHA-256 matches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_nat_rebinds_mid_transfer_the_connection_follows_or_falls_back() {
    postern_tests::kit::init_logging();
    let Some(lab) = lab_or_skip() else { return };
    let tunnel = LabTunnel::start(&lab, "auto", "auto").await;
    let t = transfer(&lab, 40, "0.25");
    wait_metric(&lab, "a", DIRECT, Duration::from_secs(20), &tunnel, |v| {
        v == 1.0
    })
    .await;
    if let Err(why) = lab.rebind("a") {
        println!("SKIPPED: cannot rebind the lab's NAT ({why}); needs conntrack-tools");
        return;
    }
    let back = "postern_inlet_path_moves_total{to=\"relayed\"}";
    wait_metric(&lab, "a", back, Duration::from_secs(15), &tunnel, |v| {
        v >= 1.0
    })
    .await;
    assert!(!t.is_finished(), "the rebinding came mid-transfer");
    let at_fallback = lab.metric("pub", FORWARDED).await.expect("relay metrics");
    finished_intact(t, 40, &tunnel).await;
    let after = lab.metric("pub", FORWARDED).await.expect("relay metrics");
    let direct_again = lab
        .metric("a", "postern_inlet_path_moves_total{to=\"direct\"}")
        .await
        .expect("inlet metrics");
    assert!(
        after - at_fallback > MIB as f64 || direct_again >= 2.0,
        "the rest of the transfer crossed the relay or a new direct path: {at_fallback} then {after}, {direct_again} moves to direct\n{}",
        tunnel.logs()
    );
}

const SNIFF_PROBE: &str = r#"
import socket, struct, sys
# Every IPv4 packet on the router's LAN port; keep the first probe that reaches the outlet.
# ETH_P_ALL: a socket bound to one protocol does not see packets the router sends.
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
s.bind(("lan", 0)); s.settimeout(30)
while True:
    frame = s.recv(2048)
    if frame[12:14] != b"\x08\x00":
        continue
    ip = frame[14:]
    ihl = (ip[0] & 15) * 4
    if ip[9] != 17 or socket.inet_ntoa(ip[16:20]) != sys.argv[1]:
        continue
    payload = ip[ihl + 8:]
    if len(payload) == 51 and payload[0] == 2:
        print(struct.unpack("!H", ip[ihl + 2:ihl + 4])[0], payload.hex())
        break
"#;

const SEND: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(0.5)
for hexed in sys.argv[3:]:
    s.sendto(bytes.fromhex(hexed), (sys.argv[1], int(sys.argv[2])))
try:
    print("answered", s.recv(100).hex())
except socket.timeout:
    print("no answer")
"#;

/// A probe captured on the outlet's network and sent again from a third namespace (the
/// outlet's router, which can reach it), and a forged one: both are ignored (no answer) and
/// counted, and the route stays direct. A third party on the public side gets nowhere near
/// the outlet: its NAT filters it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_and_replayed_probes_from_a_third_namespace_are_ignored_and_counted() {
    postern_tests::kit::init_logging();
    let Some(lab) = lab_or_skip() else { return };
    let sniffer = {
        let cmd = lab.command(
            "rb",
            &postern_tests::clients::python(),
            &["-c", SNIFF_PROBE, OUTLET_IP],
        );
        tokio::spawn(async move {
            let mut cmd = cmd;
            cmd.output().await.expect("sniffer")
        })
    };
    let tunnel = LabTunnel::start(&lab, "auto", "auto").await;
    let t = transfer(&lab, 4, "0.1");
    wait_metric(&lab, "a", DIRECT, Duration::from_secs(20), &tunnel, |v| {
        v == 1.0
    })
    .await;
    finished_intact(t, 4, &tunnel).await;
    let sniffed = sniffer.await.expect("sniffer task");
    let sniffed = String::from_utf8_lossy(&sniffed.stdout).into_owned();
    let (port, probe) = sniffed
        .trim()
        .split_once(' ')
        .unwrap_or_else(|| panic!("no probe seen on the outlet's network: {sniffed:?}"));
    let refused =
        |reason: &str| format!("postern_outlet_direct_probes_refused_total{{reason=\"{reason}\"}}");
    let replayed0 = lab.metric("b", &refused("replayed")).await.expect("metric");
    let forged0 = lab.metric("b", &refused("unknown")).await.expect("metric")
        + lab.metric("b", &refused("forged")).await.expect("metric");
    let mut forged = probe.to_owned();
    forged.replace_range(6.., &"ab".repeat(PROBE_BODY));
    let (ok, out) = lab
        .python("rb", SEND, &[OUTLET_IP, port, probe, &forged])
        .await;
    assert!(ok && out.contains("no answer"), "{out}");
    wait_metric(
        &lab,
        "b",
        &refused("replayed"),
        Duration::from_secs(5),
        &tunnel,
        |v| v > replayed0,
    )
    .await;
    let forged1 = lab.metric("b", &refused("unknown")).await.expect("metric")
        + lab.metric("b", &refused("forged")).await.expect("metric");
    assert!(forged1 > forged0, "the forged probe was counted");
    // From the public side, the outlet's NAT drops it before the outlet sees anything.
    let (ok, out) = lab.python("x", SEND, &[ROUTER_B_IP, port, &forged]).await;
    assert!(ok && out.contains("no answer"), "{out}");
    assert_eq!(lab.metric("a", DIRECT).await, Some(1.0), "still direct");
}

/// Bytes of a probe after its tag, kind and role (the forged one fills them with 0xab).
const PROBE_BODY: usize = postern_net::transport::direct::PROBE_LEN - 3;

/// The inlet's transport gauge for the lab's relay and `transport`.
fn inlet_transport(transport: &str) -> String {
    format!("postern_inlet_relay_transport{{relay=\"198.18.0.1:4433\",transport=\"{transport}\"}}")
}

/// Router A drops UDP to the relay, so the inlet (`transport = auto`) falls back to TLS/TCP,
/// while UDP between the two private networks works (both routers endpoint-independent):
/// the relay announces the inlet by its public IP and its UDP socket's port (never its TCP
/// address), the inlet probes the outlet's public address from its UDP socket, the outlet
/// probes back, and a transfer started on the relay (over the inlet's TLS/TCP link) finishes
/// on the direct path, intact; the relay's forwarded bytes stop growing, and the inlet's
/// control connection stays on TLS/TCP. As in the first test, UDP between the networks is
/// dropped until 8 MiB each way crossed the relay, so that the move comes mid-transfer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inlet_on_the_tcp_fallback_goes_direct_when_udp_between_the_nodes_works() {
    postern_tests::kit::init_logging();
    let Some(lab) = lab_or_skip() else { return };
    lab.block_relay_udp("a");
    lab.block_udp();
    let tunnel = LabTunnel::start_inlet_transport(&lab, "auto").await;
    assert_eq!(
        lab.metric("a", &inlet_transport("tcp")).await,
        Some(1.0),
        "the inlet fell back to TLS/TCP\n{}",
        tunnel.logs()
    );
    let t = transfer(&lab, 100, "0.15");
    wait_metric(
        &lab,
        "pub",
        FORWARDED,
        Duration::from_secs(30),
        &tunnel,
        |v| v >= 2.0 * 8.0 * MIB as f64,
    )
    .await;
    assert_eq!(
        lab.metric("a", DIRECT).await,
        Some(0.0),
        "{}",
        tunnel.logs()
    );
    assert!(!t.is_finished(), "the transfer is still under way");
    lab.unblock_udp();
    wait_metric(&lab, "a", DIRECT, Duration::from_secs(30), &tunnel, |v| {
        v == 1.0
    })
    .await;
    let at_move = lab.metric("pub", FORWARDED).await.expect("relay metrics");
    assert!(
        !t.is_finished(),
        "the move came before the end of the transfer\n{}",
        tunnel.logs()
    );
    finished_intact(t, 100, &tunnel).await;
    let after = lab.metric("pub", FORWARDED).await.expect("relay metrics");
    assert!(
        after - at_move < 4.0 * MIB as f64,
        "the relay kept forwarding after the move: {at_move} then {after}\n{}",
        tunnel.logs()
    );
    assert!(
        tunnel.inlet.log().contains("went direct"),
        "the inlet logs the move:\n{}",
        tunnel.inlet.log()
    );
    // The outlet verified the inlet's probes from router A's public address (its UDP
    // mapping), not from anything the TCP link showed.
    let outlet_log = tunnel.outlet.log();
    assert!(
        outlet_log
            .lines()
            .any(|l| l.contains("direct path to the inlet verified") && l.contains("198.18.0.2:")),
        "{outlet_log}"
    );
    let outlet_direct = lab
        .metric("b", "postern_outlet_routes_by_path{path=\"direct\"}")
        .await;
    assert_eq!(outlet_direct, Some(1.0), "{}", tunnel.logs());
    assert_eq!(
        lab.metric("a", &inlet_transport("tcp")).await,
        Some(1.0),
        "the control connection stays on TLS/TCP\n{}",
        tunnel.logs()
    );
    assert_eq!(
        lab.metric("pub", "postern_relay_tcp_links_open").await,
        Some(1.0),
        "{}",
        tunnel.logs()
    );
}

/// The inlet on the TLS/TCP fallback behind a NAT that maps each destination to a new random
/// port: the port the relay announces for it is not the one its probes leave from, the
/// outlet's NAT drops those probes, and no direct path is found; the connection works on the
/// relay (over the inlet's TLS/TCP link), with no failed stream, and the metrics say so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inlet_on_the_tcp_fallback_behind_a_symmetric_nat_stays_relayed_and_works() {
    postern_tests::kit::init_logging();
    let Some(lab) = lab_or_skip() else { return };
    lab.nat("a", "symmetric");
    lab.block_relay_udp("a");
    let tunnel = LabTunnel::start_inlet_transport(&lab, "auto").await;
    assert_eq!(
        lab.metric("a", &inlet_transport("tcp")).await,
        Some(1.0),
        "{}",
        tunnel.logs()
    );
    let t = transfer(&lab, 16, "0.2");
    let failed = "postern_inlet_direct_traversals_total{outcome=\"failed\"}";
    wait_metric(&lab, "a", failed, Duration::from_secs(20), &tunnel, |v| {
        v >= 1.0
    })
    .await;
    finished_intact(t, 16, &tunnel).await;
    assert_eq!(
        lab.metric("a", RELAYED).await,
        Some(1.0),
        "{}",
        tunnel.logs()
    );
    assert_eq!(lab.metric("a", DIRECT).await, Some(0.0));
    let forwarded = lab.metric("pub", FORWARDED).await.expect("relay metrics");
    assert!(forwarded > 2.0 * 16.0 * MIB as f64, "{forwarded}");
}
