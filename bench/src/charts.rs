//! PNG charts of a report (plotters, bitmap backend, text through ab_glyph with a TTF font
//! found at run time): throughput vs stream count, latency CDF, relay memory vs fleet size.

use crate::report::Report;
use anyhow::{anyhow, bail, Result};
use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

const FONT_CANDIDATES: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/liberation/LiberationSans-Regular.ttf",
];

static FONT: OnceLock<Result<(), String>> = OnceLock::new();

/// Registers a sans-serif font with plotters once (from $POSTERN_BENCH_FONT or the usual
/// places).
fn font() -> Result<()> {
    FONT.get_or_init(|| {
        let path = std::env::var("POSTERN_BENCH_FONT")
            .ok()
            .map(PathBuf::from)
            .into_iter()
            .chain(FONT_CANDIDATES.iter().map(PathBuf::from))
            .find(|p| p.is_file())
            .ok_or_else(|| {
                "no TTF font found (set POSTERN_BENCH_FONT, or install fonts-dejavu-core)"
                    .to_string()
            })?;
        let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        register_font("sans-serif", FontStyle::Normal, bytes)
            .map_err(|_| format!("{}: not a usable font", path.display()))
    })
    .clone()
    .map_err(|e| anyhow!(e))
}

fn color(i: usize) -> RGBColor {
    const C: [RGBColor; 6] = [
        RGBColor(90, 90, 90),
        RGBColor(31, 119, 180),
        RGBColor(214, 39, 40),
        RGBColor(44, 160, 44),
        RGBColor(255, 127, 14),
        RGBColor(148, 103, 189),
    ];
    C[i % C.len()]
}

fn systems<'a>(names: impl Iterator<Item = &'a str>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for n in names {
        if !out.iter().any(|o| o == n) {
            out.push(n.to_string());
        }
    }
    out
}

fn err<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow!("chart: {e}")
}

/// Writes every chart the report has data for into `dir`; returns the files written.
pub fn write(report: &Report, dir: &Path) -> Result<Vec<PathBuf>> {
    font()?;
    std::fs::create_dir_all(dir)?;
    let mut out = Vec::new();
    if let Some(b) = &report.bulk {
        if !b.rows.is_empty() {
            let path = dir.join("throughput.png");
            let names = systems(b.rows.iter().map(|r| r.system.as_str()));
            let series: Vec<(String, Vec<(f64, f64)>)> = names
                .iter()
                .map(|n| {
                    let pts = b
                        .rows
                        .iter()
                        .filter(|r| &r.system == n)
                        .map(|r| (r.streams as f64, r.gbps))
                        .collect();
                    (n.clone(), pts)
                })
                .collect();
            xy_chart(
                &path,
                "bulk throughput vs concurrent streams",
                "concurrent streams (log)",
                "Gbit/s",
                &series,
                true,
            )?;
            out.push(path);
        }
    }
    if let Some(r) = &report.rr {
        if !r.rows.is_empty() {
            let path = dir.join("latency-cdf.png");
            let series: Vec<(String, Vec<(f64, f64)>)> = r
                .rows
                .iter()
                .map(|row| {
                    let pts = row
                        .latency
                        .cdf
                        .iter()
                        .map(|&(pct, us)| (us.max(1.0), pct))
                        .collect();
                    (row.system.clone(), pts)
                })
                .collect();
            xy_chart(
                &path,
                &format!(
                    "{} B request/response latency CDF at {} req/s (open loop)",
                    r.options.size, r.options.rate
                ),
                "latency µs (log)",
                "percentile",
                &series,
                true,
            )?;
            out.push(path);
        }
    }
    if !report.fleet.is_empty() {
        let path = dir.join("fleet-memory.png");
        let pts: Vec<(f64, f64)> = report
            .fleet
            .iter()
            .map(|f| (f.routes as f64, f.relay_rss_kib[3] as f64 / 1024.0))
            .collect();
        let base: Vec<(f64, f64)> = report
            .fleet
            .iter()
            .map(|f| (f.routes as f64, f.relay_rss_kib[0] as f64 / 1024.0))
            .collect();
        xy_chart(
            &path,
            "postern relay RSS vs fleet size (routes = outlets x inlets)",
            "routes",
            "relay RSS MiB",
            &[
                ("relay, fleet up with idle streams".to_string(), pts),
                ("relay at start".to_string(), base),
            ],
            false,
        )?;
        out.push(path);
    }
    Ok(out)
}

fn xy_chart(
    path: &Path,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    series: &[(String, Vec<(f64, f64)>)],
    log_x: bool,
) -> Result<()> {
    let all: Vec<(f64, f64)> = series.iter().flat_map(|(_, p)| p.iter().copied()).collect();
    if all.is_empty() {
        bail!("chart {title}: no data");
    }
    let (mut x0, mut x1) = (f64::MAX, f64::MIN);
    let mut y1 = f64::MIN;
    for &(x, y) in &all {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y1 = y1.max(y);
    }
    let y0 = 0.0;
    let y1 = if y1 <= y0 { y0 + 1.0 } else { y1 * 1.1 };
    let root = BitMapBackend::new(path, (960, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let mut builder = ChartBuilder::on(&root);
    builder
        .caption(title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(64);
    let style = |c: RGBColor| ShapeStyle {
        color: c.to_rgba(),
        filled: false,
        stroke_width: 2,
    };
    macro_rules! draw {
        ($chart:ident) => {{
            $chart
                .configure_mesh()
                .x_desc(x_desc)
                .x_label_formatter(&|x| format!("{x:.0}"))
                .y_desc(y_desc)
                .label_style(("sans-serif", 15))
                .draw()
                .map_err(err)?;
            for (i, (name, pts)) in series.iter().enumerate() {
                let c = color(i);
                $chart
                    .draw_series(LineSeries::new(pts.iter().copied(), style(c)))
                    .map_err(err)?
                    .label(name.as_str())
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], style(c)));
                $chart
                    .draw_series(pts.iter().map(|&p| Circle::new(p, 3, c.filled())))
                    .map_err(err)?;
            }
            $chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperLeft)
                .label_font(("sans-serif", 15))
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .draw()
                .map_err(err)?;
        }};
    }
    if log_x {
        let lo = (x0 * 0.8).max(1e-3);
        let hi = (x1 * 1.25).max(lo * 2.0);
        let mut chart = builder
            .build_cartesian_2d((lo..hi).log_scale(), y0..y1)
            .map_err(err)?;
        draw!(chart);
    } else {
        let hi = if x1 <= 0.0 { 1.0 } else { x1 * 1.1 };
        let mut chart = builder.build_cartesian_2d(0.0..hi, y0..y1).map_err(err)?;
        draw!(chart);
    }
    root.present().map_err(err)?;
    Ok(())
}
