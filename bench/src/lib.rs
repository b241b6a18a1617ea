//! postern-bench: throughput, latency, connection opens, HTTP writes and fleets through
//! postern (inlet -> relay -> outlet), measured against direct TCP (and optionally other
//! tunnels) in the same run. The binary in `main.rs` only parses flags; everything runs from
//! here so tests can drive it in-process.

pub mod attack;
pub mod bulk;
pub mod charts;
pub mod cluster;
pub mod direct;
pub mod fleet;
pub mod fleet_etcd;
pub mod http;
pub mod lossy;
pub mod open;
pub mod progress;
pub mod report;
pub mod rr;
pub mod stats;
pub mod systems;
pub mod target;

use anyhow::Result;
use cluster::RelayMode;
use report::{Machine, Report};

/// Which scenarios to run, with their options.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    pub bulk: Option<bulk::BulkOptions>,
    pub rr: Option<rr::RrOptions>,
    pub open: Option<open::OpenOptions>,
    /// One fleet run per entry (e.g. a sweep over the number of outlets).
    pub fleet: Vec<fleet::FleetOptions>,
    pub http: Option<http::HttpOptions>,
    pub lossy: Option<lossy::LossyOptions>,
}

impl Plan {
    /// Every scenario with its standard (or quick) sizes.
    pub fn all(quick: bool, baselines: bool) -> Self {
        if quick {
            Self {
                bulk: Some(bulk::BulkOptions {
                    baselines,
                    ..bulk::BulkOptions::quick()
                }),
                rr: Some(rr::RrOptions {
                    baselines,
                    ..rr::RrOptions::quick()
                }),
                open: Some(open::OpenOptions {
                    baselines,
                    ..open::OpenOptions::quick()
                }),
                fleet: vec![fleet::FleetOptions::quick()],
                http: Some(http::HttpOptions::quick()),
                lossy: Some(lossy::LossyOptions::quick()),
            }
        } else {
            Self {
                bulk: Some(bulk::BulkOptions {
                    baselines,
                    ..bulk::BulkOptions::standard()
                }),
                rr: Some(rr::RrOptions {
                    baselines,
                    ..rr::RrOptions::standard()
                }),
                open: Some(open::OpenOptions {
                    baselines,
                    ..open::OpenOptions::standard()
                }),
                fleet: vec![fleet::FleetOptions::standard()],
                http: Some(http::HttpOptions::standard()),
                lossy: Some(lossy::LossyOptions::standard()),
            }
        }
    }
}

/// Runs the plan's scenarios one after another (each with its own relay and nodes).
pub async fn run(plan: &Plan, mode: &RelayMode, quick: bool, command: &str) -> Result<Report> {
    let pki = cluster::bench_pki()?;
    let mut report = Report {
        machine: Machine::probe(),
        command: command.to_string(),
        unix_time: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        quick,
        relay_mode: match mode {
            RelayMode::InProcess => "in-process".into(),
            RelayMode::Child(_) => "separate process".into(),
        },
        ..Report::default()
    };
    if let Some(o) = &plan.bulk {
        report.bulk = Some(bulk::run(&pki, mode, o).await?);
    }
    if let Some(o) = &plan.rr {
        report.rr = Some(rr::run(&pki, mode, o).await?);
    }
    if let Some(o) = &plan.open {
        report.open = Some(open::run(&pki, mode, o).await?);
    }
    if let Some(o) = &plan.http {
        report.http = Some(http::run(&pki, mode, o).await?);
    }
    for o in &plan.fleet {
        report.fleet.push(fleet::run(&pki, mode, o).await?);
    }
    if let Some(o) = &plan.lossy {
        // Always in-process: the impairment proxy is what shapes the figures, not the relay.
        report.lossy = Some(lossy::run(&pki, o).await?);
    }
    Ok(report)
}
