//! Latency summaries.

use serde::Serialize;
use std::time::Duration;

/// Percentiles of a set of latencies, in microseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Latency {
    pub samples: usize,
    pub mean_us: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    /// (percentile, microseconds) at up to 200 points, for CDF charts.
    pub cdf: Vec<(f64, f64)>,
}

impl Latency {
    pub fn from_ns(mut ns: Vec<u64>) -> Self {
        if ns.is_empty() {
            return Self::default();
        }
        ns.sort_unstable();
        let n = ns.len();
        let at = |q: f64| -> f64 {
            let i = ((q * n as f64).ceil() as usize).clamp(1, n) - 1;
            ns[i] as f64 / 1000.0
        };
        let points = n.min(200);
        let cdf = (0..points)
            .map(|k| {
                let q = (k + 1) as f64 / points as f64;
                (q * 100.0, at(q))
            })
            .collect();
        Self {
            samples: n,
            mean_us: ns.iter().map(|&v| v as f64).sum::<f64>() / n as f64 / 1000.0,
            p50_us: at(0.50),
            p90_us: at(0.90),
            p99_us: at(0.99),
            p999_us: at(0.999),
            max_us: ns[n - 1] as f64 / 1000.0,
            cdf,
        }
    }
}

pub fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// The median of a non-empty list (0 when empty).
pub fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let m = s.len() / 2;
    if s.len() % 2 == 1 {
        s[m]
    } else {
        (s[m - 1] + s[m]) / 2.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let l = Latency::from_ns((1..=1000).map(|v| v * 1000).collect());
        assert_eq!(l.p50_us, 500.0);
        assert_eq!(l.p99_us, 990.0);
        assert_eq!(l.p999_us, 999.0);
        assert_eq!(l.max_us, 1000.0);
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
    }
}
