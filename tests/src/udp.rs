//! UDP services as tests drive them: a real relay, outlet and inlets (the binaries, see
//! [`crate::procs`]) set up for one service, a UDP echo target, and the nodes' UDP metrics.

use crate::ops;
use crate::ports::{free_port, free_udp_addr};
use crate::procs::{Proc, RelayCa};
use std::net::SocketAddr;
use tokio::net::UdpSocket;
use tokio::task::JoinHandle;

/// A UDP server on 127.0.0.1 that sends every datagram back to its sender.
pub async fn udp_echo_server() -> (SocketAddr, JoinHandle<()>) {
    let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind echo");
    let addr = socket.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        let mut buf = vec![0u8; 65_535];
        while let Ok((n, peer)) = socket.recv_from(&mut buf).await {
            let _ = socket.send_to(&buf[..n], peer).await;
        }
    });
    (addr, task)
}

/// One inlet of a [`UdpStack`]: its process, UDP listener and operations endpoint.
pub struct UdpInlet {
    pub proc: Proc,
    pub listen: SocketAddr,
    pub ops: SocketAddr,
}

/// A relay, an outlet offering `service` over UDP, and inlets listening for it, all real
/// processes logging into `dir`.
pub struct UdpStack {
    pub dir: tempfile::TempDir,
    pub relay: Proc,
    pub outlet: Proc,
    pub outlet_ops: SocketAddr,
    pub inlets: Vec<UdpInlet>,
}

impl UdpStack {
    /// Starts the stack: the outlet forwards `service` to `target` with the extra `--service`
    /// options `outlet_opts` (e.g. `,allow=name = "a"`); one inlet per name in `inlets`
    /// (each role `udp-client`), listening on a free UDP port. Returns once every node is ready.
    pub async fn start(
        service: &str,
        target: SocketAddr,
        outlet_opts: &str,
        inlets: &[&str],
    ) -> UdpStack {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = |p: &str| dir.path().join(p).display().to_string();
        let state = path("relay-state");
        let relay_addr = free_udp_addr().to_string();
        let ca = RelayCa::init(&state, &relay_addr).await;
        let relay_ops: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        let register = format!("{service}=role = \"udp-outlet\"");
        let route = format!("{service}=role = \"udp-client\"");
        let mut relay = Proc::spawn(
            dir.path(),
            "relay",
            "postern-relay",
            &[
                "run",
                "--state-dir",
                &state,
                "--listen",
                &relay_addr,
                "--allow-register",
                &register,
                "--allow-route",
                &route,
                "--metrics-addr",
                &relay_ops.to_string(),
                "--drain-timeout",
                "1s",
            ],
        );
        relay.wait_ready(relay_ops).await;

        let outlet_ops: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        let outlet_ticket = ca.ticket("udp-outlet").await;
        let outlet_service = format!("{service}={target},protocol=udp{outlet_opts}");
        let mut outlet = Proc::spawn(
            dir.path(),
            "outlet",
            "postern-outlet",
            &[
                "run",
                "--ticket",
                &outlet_ticket,
                "--name",
                "udp-outlet",
                "--state-dir",
                &path("outlet-state"),
                "--service",
                &outlet_service,
                "--metrics-addr",
                &outlet_ops.to_string(),
                "--drain-timeout",
                "1s",
            ],
        );
        outlet.wait_ready(outlet_ops).await;

        let mut started = Vec::new();
        for name in inlets {
            let ticket = ca.ticket("udp-client").await;
            let listen = free_udp_addr();
            let ops: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
            let mut p = Proc::spawn(
                dir.path(),
                name,
                "postern-inlet",
                &[
                    "run",
                    "--ticket",
                    &ticket,
                    "--name",
                    name,
                    "--state-dir",
                    &path(&format!("{name}-state")),
                    "--service",
                    &format!("{service}={listen},protocol=udp"),
                    "--metrics-addr",
                    &ops.to_string(),
                    "--drain-timeout",
                    "1s",
                ],
            );
            p.wait_ready(ops).await;
            started.push(UdpInlet {
                proc: p,
                listen,
                ops,
            });
        }
        UdpStack {
            dir,
            relay,
            outlet,
            outlet_ops,
            inlets: started,
        }
    }

    /// Every process's log, for a failing check's message.
    pub fn logs(&self) -> String {
        let mut out = format!(
            "--- relay\n{}\n--- outlet\n{}\n",
            self.relay.log(),
            self.outlet.log()
        );
        for i in &self.inlets {
            out.push_str(&format!("--- {}\n{}\n", i.proc.name, i.proc.log()));
        }
        out
    }
}

/// The sum of the samples of `name` with `labels` at the operations endpoint `ops` (0 if none).
pub async fn udp_metric(ops: SocketAddr, name: &str, labels: &[(&str, &str)]) -> f64 {
    let (status, body) = ops::get(ops, "/metrics").await.expect("scrape /metrics");
    assert_eq!(status, 200, "{body}");
    ops::metric(&body, name, labels).unwrap_or(0.0)
}
