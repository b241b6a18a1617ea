//! Progress of a run: a bar on a terminal, plain timed lines in logs and CI. Kept apart from
//! `report.rs` so the scenarios that report progress sit below the report that sums them up.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

static QUIET: AtomicBool = AtomicBool::new(false);
static START: OnceLock<Instant> = OnceLock::new();
static BAR: OnceLock<Option<ProgressBar>> = OnceLock::new();

/// Silences [`progress`] (tests).
pub fn set_quiet(q: bool) {
    QUIET.store(q, Ordering::Relaxed);
}

/// The progress bar, drawn on stderr when it is a terminal; `None` in logs and CI, where
/// [`progress`] prints plain lines instead.
fn bar() -> Option<&'static ProgressBar> {
    BAR.get_or_init(|| {
        if QUIET.load(Ordering::Relaxed) || !std::io::stderr().is_terminal() {
            return None;
        }
        let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
        let style = ProgressStyle::with_template(
            "[{elapsed_precise}] {bar:30.cyan/blue} {pos}/{len} steps  {wide_msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar());
        bar.set_style(style);
        bar.enable_steady_tick(std::time::Duration::from_millis(250));
        Some(bar)
    })
    .as_ref()
}

/// Announces `n` more steps (each later [`progress`] call is one): scenarios call it once they
/// know their size, so the bar's length grows as the plan unfolds.
pub fn add_steps(n: usize) {
    if let Some(bar) = bar() {
        bar.inc_length(n as u64);
    }
}

/// Starts a step: advances the bar and shows `msg`, or prints one line on stderr with the time
/// since the first one.
pub fn progress(msg: &str) {
    let start = *START.get_or_init(Instant::now);
    if QUIET.load(Ordering::Relaxed) {
        return;
    }
    match bar() {
        Some(bar) => {
            bar.inc(1);
            bar.set_message(msg.to_string());
        }
        None => eprintln!("[{:>7.1}s] {msg}", start.elapsed().as_secs_f64()),
    }
}

/// Clears the bar before the summary tables are printed.
pub fn finish_progress() {
    if let Some(bar) = bar() {
        bar.finish_and_clear();
    }
}
