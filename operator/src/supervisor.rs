//! Every long-running task of the process, watched: the API server, the
//! caches, the controllers and the fleet's tasks. None of them may end while
//! the process runs, so the first that ends (returns or panics) ends the
//! process, which gives up the lease for a healthy replica to take.

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use tokio::task::{Id, JoinSet};

/// How long a task named by the fault hook runs before it ends.
const FAULT_AFTER: Duration = Duration::from_secs(1);

/// A task that ended, and how.
#[derive(Debug)]
pub struct Ended {
    pub task: String,
    pub how: String,
}

/// The process's long-running tasks.
#[derive(Default)]
pub struct Supervisor {
    tasks: JoinSet<()>,
    names: HashMap<Id, String>,
    /// Test hook: this task ends soon after it starts, as if it had failed.
    fault: Option<String>,
}

impl Supervisor {
    /// `fault` names a task to end on purpose (tests of this very path).
    pub fn new(fault: Option<String>) -> Self {
        Self { fault, ..Self::default() }
    }

    /// Runs `task` until the process ends; its end ends the process.
    pub fn spawn(&mut self, name: impl Into<String>, task: impl Future<Output = ()> + Send + 'static) {
        let name = name.into();
        let handle = if self.fault.as_deref() == Some(name.as_str()) {
            tracing::warn!(task = %name, "fault hook: this task will end in {FAULT_AFTER:?}");
            self.tasks.spawn(async move {
                tokio::select! {
                    () = task => {}
                    () = tokio::time::sleep(FAULT_AFTER) => {}
                }
            })
        } else {
            self.tasks.spawn(task)
        };
        self.names.insert(handle.id(), name);
    }

    /// Waits for the first task to end. With no task at all it waits forever.
    pub async fn ended(&mut self) -> Ended {
        let Some(joined) = self.tasks.join_next_with_id().await else {
            return std::future::pending().await;
        };
        let (id, how) = match joined {
            Ok((id, ())) => (id, "returned".to_string()),
            Err(e) if e.is_panic() => (e.id(), format!("panicked: {}", panic_message(e.into_panic()))),
            Err(e) => (e.id(), "was cancelled".to_string()),
        };
        Ended { task: self.names.remove(&id).unwrap_or_else(|| "unknown".into()), how }
    }
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_first_task_to_end_is_named_with_how() {
        let mut supervisor = Supervisor::default();
        supervisor.spawn("forever", std::future::pending());
        supervisor.spawn("quits", async {});
        let ended = supervisor.ended().await;
        assert_eq!((ended.task.as_str(), ended.how.as_str()), ("quits", "returned"));

        supervisor.spawn("panics", async { panic!("boom") });
        let ended = supervisor.ended().await;
        assert_eq!((ended.task.as_str(), ended.how.as_str()), ("panics", "panicked: boom"));
    }

    #[tokio::test(start_paused = true)]
    async fn the_fault_hook_ends_the_named_task() {
        let mut supervisor = Supervisor::new(Some("victim".into()));
        supervisor.spawn("bystander", std::future::pending());
        supervisor.spawn("victim", std::future::pending());
        let ended = supervisor.ended().await;
        assert_eq!(ended.task, "victim");
    }
}
