//! The summary tables and the JSON report.

use crate::bulk::BulkReport;
use crate::fleet::FleetReport;
use crate::http::HttpReport;
use crate::lossy::LossyReport;
use crate::open::OpenReport;
use crate::rr::RrReport;
use serde::Serialize;
use std::fmt::Write as _;

/// What the figures were measured on.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Machine {
    pub cpus: usize,
    pub cpu_model: String,
    pub kernel: String,
    pub mem_total_kib: u64,
}

impl Machine {
    pub fn probe() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map(|v| v.trim_start_matches([' ', '\t', ':']).trim().to_string())
            .unwrap_or_default();
        let mem_total_kib = std::fs::read_to_string("/proc/meminfo")
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0);
        Self {
            cpus: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(0),
            cpu_model,
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_string(),
            mem_total_kib,
        }
    }
}

/// Everything one invocation measured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub machine: Machine,
    pub command: String,
    pub unix_time: u64,
    pub quick: bool,
    pub relay_mode: String,
    pub bulk: Option<BulkReport>,
    pub rr: Option<RrReport>,
    pub open: Option<OpenReport>,
    pub fleet: Vec<FleetReport>,
    pub http: Option<HttpReport>,
    pub lossy: Option<LossyReport>,
}

fn opt(v: Option<f64>, prec: usize) -> String {
    v.map(|x| format!("{x:.prec$}"))
        .unwrap_or_else(|| "-".into())
}

impl Report {
    /// Errors over every scenario, leaving out third-party baselines (whose failures are
    /// shown in the tables but are not postern's).
    pub fn errors(&self) -> u64 {
        let ours = |s: &str| s == "direct" || s.starts_with("postern");
        let mut n = 0;
        if let Some(b) = &self.bulk {
            n += b
                .rows
                .iter()
                .filter(|r| ours(&r.system))
                .map(|r| r.errors)
                .sum::<u64>();
        }
        if let Some(r) = &self.rr {
            n += r
                .rows
                .iter()
                .filter(|r| ours(&r.system))
                .map(|r| r.errors)
                .sum::<u64>();
        }
        if let Some(o) = &self.open {
            n += o
                .rows
                .iter()
                .filter(|r| ours(&r.system))
                .map(|r| r.errors)
                .sum::<u64>();
        }
        n += self.fleet.iter().map(|f| f.errors).sum::<u64>();
        if let Some(h) = &self.http {
            n += h.rows.iter().map(|r| r.errors).sum::<u64>();
        }
        if let Some(l) = &self.lossy {
            n += l.rows.iter().map(|r| r.errors).sum::<u64>();
        }
        n
    }

    /// The summary tables (Markdown, so they paste into RESULTS.md).
    pub fn tables(&self) -> String {
        let mut o = String::new();
        let m = &self.machine;
        let _ = writeln!(
            o,
            "machine: {} CPUs, {}, kernel {}; relay: {}{}\n",
            m.cpus,
            m.cpu_model,
            m.kernel,
            self.relay_mode,
            if self.quick { "; --quick" } else { "" }
        );
        if let Some(b) = &self.bulk {
            let _ = writeln!(
                o,
                "### bulk (client -> inlet -> relay -> outlet -> sink, verified)\n"
            );
            let _ = writeln!(o, "| streams | system | KiB/stream | Gbit/s | runs | vs direct | relay CPU s/GiB | bench CPU s/GiB | UDP drops | verified | errors |");
            let _ = writeln!(o, "|---:|---|---:|---:|---|---:|---:|---:|---:|---:|---:|");
            for r in &b.rows {
                let runs: Vec<String> = r.runs_gbps.iter().map(|g| format!("{g:.2}")).collect();
                let _ = writeln!(
                    o,
                    "| {} | {} | {} | {:.2} | {} | {} | {} | {:.2} | {} | {} | {} |",
                    r.streams,
                    r.system,
                    r.bytes_per_stream >> 10,
                    r.gbps,
                    runs.join(" "),
                    opt(r.ratio_to_direct, 2),
                    opt(r.relay_cpu_s_per_gib, 2),
                    r.bench_cpu_s_per_gib,
                    r.udp_drops.map_or("-".into(), |d| d.to_string()),
                    r.verified_streams,
                    r.errors
                );
            }
            for n in &b.notes {
                let _ = writeln!(o, "\n- {n}");
            }
            let _ = writeln!(o);
        }
        if let Some(r) = &self.rr {
            let _ = writeln!(
                o,
                "### rr ({} B echo, open loop at {} req/s for {} s)\n",
                r.options.size, r.options.rate, r.options.secs
            );
            let _ = writeln!(o, "| system | p50 µs | p90 µs | p99 µs | p99.9 µs | max µs | added p50 | added p99 | added p99.9 | sent | received | errors |");
            let _ = writeln!(
                o,
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
            );
            for x in &r.rows {
                let l = &x.latency;
                let _ = writeln!(
                    o,
                    "| {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {} | {} | {} | {} | {} | {} |",
                    x.system,
                    l.p50_us,
                    l.p90_us,
                    l.p99_us,
                    l.p999_us,
                    l.max_us,
                    opt(x.added_p50_us, 0),
                    opt(x.added_p99_us, 0),
                    opt(x.added_p999_us, 0),
                    x.sent,
                    x.received,
                    x.errors
                );
            }
            let _ = writeln!(o);
        }
        if let Some(r) = &self.open {
            let _ = writeln!(
                o,
                "### open (connect + 1 byte echoed, warm tunnel; {} opens per row)\n",
                r.options.count
            );
            let _ = writeln!(o, "| concurrency | system | opens/s | vs direct | p50 µs | p99 µs | max µs | errors |");
            let _ = writeln!(o, "|---:|---|---:|---:|---:|---:|---:|---:|");
            for x in &r.rows {
                let _ = writeln!(
                    o,
                    "| {} | {} | {:.0} | {} | {:.0} | {:.0} | {:.0} | {} |",
                    x.concurrency,
                    x.system,
                    x.per_sec,
                    opt(x.ratio_to_direct, 2),
                    x.latency.p50_us,
                    x.latency.p99_us,
                    x.latency.max_us,
                    x.errors
                );
            }
            let _ = writeln!(o);
        }
        if !self.fleet.is_empty() {
            let _ = writeln!(
                o,
                "### fleet (outlets x inlets x idle streams per route, one relay)\n"
            );
            let mut head = "| figure |".to_string();
            let mut rule = "|---|".to_string();
            for f in &self.fleet {
                let _ = write!(
                    head,
                    " {}x{}x{} |",
                    f.options.outlets, f.options.inlets, f.options.streams
                );
                rule.push_str("---:|");
            }
            let _ = writeln!(o, "{head}\n{rule}");
            type Cell = fn(&FleetReport) -> String;
            let rows: [(&str, Cell); 11] = [
                ("nodes / routes / idle streams", |f| {
                    format!("{} / {} / {}", f.nodes, f.routes, f.streams)
                }),
                ("relay RSS KiB: start / +nodes / +routes / +streams", |f| {
                    let r = f.relay_rss_kib;
                    format!("{} / {} / {} / {}", r[0], r[1], r[2], r[3])
                }),
                ("relay KiB per node (control connection)", |f| {
                    format!("{:.1}", f.relay_kib_per_node)
                }),
                ("relay bytes per route", |f| {
                    format!("{:.0}", f.relay_bytes_per_route)
                }),
                ("relay bytes per idle stream", |f| {
                    format!("{:.0}", f.relay_bytes_per_idle_stream)
                }),
                ("bench process bytes per idle stream", |f| {
                    format!("{:.0}", f.bench_bytes_per_idle_stream)
                }),
                ("relay CPU s (whole run)", |f| {
                    format!("{:.2}", f.relay_cpu_s)
                }),
                ("s: nodes up / routes set up / streams opened", |f| {
                    format!(
                        "{:.2} / {:.2} / {:.2}",
                        f.setup_nodes_s, f.setup_routes_s, f.open_streams_s
                    )
                }),
                ("relay routes at end / granted / refused", |f| {
                    let s = &f.relay_stats;
                    format!("{} / {} / {}", s.routes, s.routes_granted, s.routes_refused)
                }),
                ("relay frames dropped", |f| {
                    f.relay_stats.dropped().to_string()
                }),
                ("errors", |f| f.errors.to_string()),
            ];
            for (k, cell) in rows {
                let mut line = format!("| {k} |");
                for f in &self.fleet {
                    let _ = write!(line, " {} |", cell(f));
                }
                let _ = writeln!(o, "{line}");
            }
            if let Some(f) = self.fleet.first() {
                for n in &f.notes {
                    let _ = writeln!(o, "\n- {n}");
                }
            }
            for f in &self.fleet {
                if !f.error_samples.is_empty() {
                    let _ = writeln!(o, "\nerrors: {:?}", f.error_samples);
                }
            }
            let _ = writeln!(o);
        }
        if let Some(h) = &self.http {
            let _ = writeln!(o, "### http ({})\n", h.what);
            let _ = writeln!(
                o,
                "| system | requests | req/s | vs direct | p50 µs | p99 µs | errors |"
            );
            let _ = writeln!(o, "|---|---:|---:|---:|---:|---:|---:|");
            for x in &h.rows {
                let _ = writeln!(
                    o,
                    "| {} | {} | {:.0} | {} | {:.0} | {:.0} | {} |",
                    x.system,
                    x.requests,
                    x.per_sec,
                    opt(x.ratio_to_direct, 2),
                    x.latency.p50_us,
                    x.latency.p99_us,
                    x.errors
                );
            }
            if let Some(f) = &h.filter {
                let _ = writeln!(
                    o,
                    "\nRequestFilter alone: {:.0} ns per request ({} B line-protocol body, {:.2} GB/s)",
                    f.ns_per_request, f.body_bytes, f.gbytes_per_s
                );
            }
            for n in &h.notes {
                let _ = writeln!(o, "\n- {n}");
            }
            let _ = writeln!(o);
        }
        if let Some(l) = &self.lossy {
            let _ = writeln!(
                o,
                "### lossy ({} ms each way, {}-byte MTU)\n",
                l.options.delay_ms, l.options.mtu
            );
            let _ = writeln!(o, "| congestion | loss % | MB/s | echo p50 ms | echo p99 ms | echo max ms | oversize drops (warm-up / after) | errors |");
            let _ = writeln!(o, "|---|---:|---:|---:|---:|---:|---:|---:|");
            for x in &l.rows {
                let _ = writeln!(
                    o,
                    "| {} | {} | {:.2} | {:.1} | {:.1} | {:.1} | {} / {} | {} |",
                    x.congestion,
                    x.loss_pct,
                    x.mbyte_s,
                    x.latency.p50_us / 1000.0,
                    x.latency.p99_us / 1000.0,
                    x.latency.max_us / 1000.0,
                    x.oversize_in_warmup,
                    x.oversize_after_warmup,
                    x.errors
                );
            }
            for x in l.rows.iter().filter(|x| !x.error_samples.is_empty()) {
                let _ = writeln!(
                    o,
                    "\nerrors ({} {}%): {:?}",
                    x.congestion, x.loss_pct, x.error_samples
                );
            }
            for n in &l.notes {
                let _ = writeln!(o, "\n- {n}");
            }
            let _ = writeln!(o);
        }
        o
    }
}
