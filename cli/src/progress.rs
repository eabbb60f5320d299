//! The progress bar on stderr: the run's planned time filling up, the
//! phase, and the live latency or rate.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::engine::{Direction, Observer, Phase};
use crate::output::number;

/// How often the bar redraws.
const TICK: Duration = Duration::from_millis(100);

/// A progress bar that follows a run.
pub(crate) struct Bar {
    bar: ProgressBar,
    live: Mutex<Live>,
}

#[derive(Default)]
struct Live {
    phase: &'static str,
    rtt_ms: Option<f64>,
    down_mbps: Option<f64>,
    up_mbps: Option<f64>,
}

impl Bar {
    /// A bar for a run planned to take `planned` (zero when unknown: a
    /// spinner); hidden unless `visible`.
    pub(crate) fn start(planned: Duration, visible: bool) -> Arc<Self> {
        let millis = u64::try_from(planned.as_millis()).unwrap_or(u64::MAX);
        let bar = if !visible {
            ProgressBar::hidden()
        } else if millis == 0 {
            let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template("{spinner} {msg} {elapsed}").unwrap_or(ProgressStyle::default_spinner()),
            );
            bar
        } else {
            let bar = ProgressBar::with_draw_target(Some(millis), ProgressDrawTarget::stderr());
            let style = ProgressStyle::with_template("{bar:30} {elapsed:>3} of {prefix}  {msg}")
                .unwrap_or(ProgressStyle::default_bar())
                .progress_chars("█▌ ");
            bar.set_style(style);
            bar.set_prefix(format!("{:.0}s", planned.as_secs_f64().ceil()));
            bar
        };
        let this = Arc::new(Self { bar, live: Mutex::new(Live::default()) });
        if visible {
            let ticking = Arc::downgrade(&this);
            let started = Instant::now();
            tokio::spawn(async move {
                let mut ticks = tokio::time::interval(TICK);
                loop {
                    ticks.tick().await;
                    let Some(bar) = ticking.upgrade() else { break };
                    if bar.bar.is_finished() {
                        break;
                    }
                    bar.draw(started.elapsed());
                }
            });
        }
        this
    }

    fn draw(&self, elapsed: Duration) {
        let live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
        let mut message = live.phase.to_string();
        if let Some(mbps) = live.down_mbps {
            message.push_str(&format!("  ↓ {} Mbit/s", number(mbps)));
        }
        if let Some(mbps) = live.up_mbps {
            message.push_str(&format!("  ↑ {} Mbit/s", number(mbps)));
        }
        if let Some(ms) = live.rtt_ms {
            message.push_str(&format!("  {} ms", number(ms)));
        }
        drop(live);
        if let Some(length) = self.bar.length() {
            self.bar.set_position(u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX).min(length));
        } else {
            self.bar.tick();
        }
        self.bar.set_message(message);
    }

    /// Removes the bar.
    pub(crate) fn finish(&self) {
        self.bar.finish_and_clear();
    }

    /// Prints a line above the bar.
    pub(crate) fn println(&self, line: &str) {
        if self.bar.is_hidden() {
            eprintln!("{line}");
        } else {
            self.bar.suspend(|| eprintln!("{line}"));
        }
    }
}

impl Observer for Bar {
    fn phase(&self, phase: &Phase) {
        let mut live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
        *live = Live { phase: phase.kind.label(), rtt_ms: live.rtt_ms, ..Live::default() };
    }

    fn rtt(&self, ms: f64) {
        self.live.lock().unwrap_or_else(PoisonError::into_inner).rtt_ms = Some(ms);
    }

    fn rate(&self, direction: Direction, mbps: f64) {
        let mut live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
        match direction {
            Direction::Down => live.down_mbps = Some(mbps),
            Direction::Up => live.up_mbps = Some(mbps),
        }
    }

    fn warn(&self, message: &str) {
        self.println(&format!("warning: {message}"));
    }
}
