//! Continuous mode: the targets every interval, each run escalating on its
//! own, its results handed to a caller's async sink.

use std::time::Duration;

use tidepool_crds::test_session::ProbeTarget;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::{MissedTickBehavior, interval};

use super::{ProbeSettings, Run, run};

/// The shortest interval a runner keeps, so that a zero cannot make it spin.
const MIN_INTERVAL: Duration = Duration::from_millis(100);

/// How often, from which tier, and how many times.
#[derive(Clone, Debug, PartialEq)]
pub struct ContinuousSettings {
    /// From the start of one run to the start of the next (at least 100 ms).
    /// A run that takes longer is followed at once by the next.
    pub interval: Duration,
    /// The tier each run starts from.
    pub start_tier: u8,
    /// Stop after this many runs; `None` runs until stopped.
    pub max_runs: Option<u64>,
}

impl Default for ContinuousSettings {
    fn default() -> Self {
        Self { interval: Duration::from_secs(300), start_tier: 1, max_runs: None }
    }
}

/// One run of a continuous runner, for the sink.
#[derive(Clone, Debug)]
pub struct ContinuousRun {
    /// 1 for the first run.
    pub number: u64,
    pub run: Run,
}

/// A running continuous runner. Dropping it stops the runner too.
#[derive(Debug)]
pub struct Continuous {
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

/// Starts a runner on the current Tokio runtime: a run at once, then one
/// every interval. Runs never overlap: the sink's future is awaited before the
/// next run is due, so a slow sink delays the runs rather than piling them up.
pub fn spawn_continuous<S, F>(
    targets: Vec<ProbeTarget>,
    settings: ProbeSettings,
    every: ContinuousSettings,
    mut sink: S,
) -> Continuous
where
    S: FnMut(ContinuousRun) -> F + Send + 'static,
    F: Future<Output = ()> + Send + 'static,
{
    let (stop, mut stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let mut ticks = interval(every.interval.max(MIN_INTERVAL));
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut number = 0;
        while every.max_runs.is_none_or(|max| number < max) {
            number += 1;
            let next = async {
                ticks.tick().await;
                let run = run(&targets, every.start_tier, &settings).await;
                sink(ContinuousRun { number, run }).await;
            };
            tokio::select! {
                // A stop, or the handle dropped.
                _ = &mut stopped => break,
                () = next => {}
            }
        }
    });
    Continuous { stop: Some(stop), task }
}

impl Continuous {
    /// Stops the runner, cancelling a run (or a sink call) in progress, and
    /// waits until it has ended.
    pub async fn stop(mut self) {
        self.stop.take();
        let _ = (&mut self.task).await;
    }

    /// Waits until the runner has made its `max_runs` runs.
    pub async fn finished(mut self) {
        let _ = (&mut self.task).await;
    }

    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }
}

impl Drop for Continuous {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use tidepool_crds::test_session::ProbeKind;
    use tokio::time::Instant;

    fn unreachable_target() -> Vec<ProbeTarget> {
        // A malformed target fails at once, without I/O.
        vec![ProbeTarget { kind: ProbeKind::Tcp, url: None, host: Some("h".into()), port: None }]
    }

    #[tokio::test(start_paused = true)]
    async fn runs_every_interval_up_to_max_runs() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink_seen = Arc::clone(&seen);
        let start = Instant::now();
        let every = ContinuousSettings { interval: Duration::from_secs(300), start_tier: 1, max_runs: Some(3) };
        let runner = spawn_continuous(unreachable_target(), ProbeSettings::default(), every, move |run| {
            let seen = Arc::clone(&sink_seen);
            async move {
                seen.lock().unwrap().push((run.number, Instant::now(), run.run.results()));
            }
        });
        runner.finished().await;
        let seen = seen.lock().unwrap();
        let numbers: Vec<u64> = seen.iter().map(|(number, _, _)| *number).collect();
        assert_eq!(numbers, [1, 2, 3]);
        let offsets: Vec<u64> = seen.iter().map(|(_, at, _)| (*at - start).as_secs()).collect();
        assert_eq!(offsets, [0, 300, 600]);
        assert_eq!(seen[0].2[0].error.as_deref(), Some("the tcp probe needs a port"));
    }

    #[tokio::test(start_paused = true)]
    async fn stops_between_runs() {
        let count = Arc::new(Mutex::new(0));
        let sink_count = Arc::clone(&count);
        let runner = spawn_continuous(
            unreachable_target(),
            ProbeSettings::default(),
            ContinuousSettings::default(),
            move |_| {
                let count = Arc::clone(&sink_count);
                async move { *count.lock().unwrap() += 1 }
            },
        );
        tokio::time::sleep(Duration::from_secs(301)).await;
        assert!(!runner.is_finished());
        runner.stop().await;
        assert_eq!(*count.lock().unwrap(), 2);
    }
}
