//! The gateway's long-lived tasks (watches, servers), supervised: when one
//! ends, for whatever reason, the process learns which and exits, and
//! Kubernetes starts a fresh one.

use std::future::Future;

use tokio::task::JoinSet;

/// Named tasks; [`Tasks::ended`] says which ended first and how.
#[derive(Default)]
pub struct Tasks {
    set: JoinSet<String>,
}

impl Tasks {
    pub fn spawn(&mut self, name: String, task: impl Future<Output = ()> + Send + 'static) {
        self.set.spawn(async move {
            task.await;
            name
        });
    }

    /// Waits for the first task to end: its name, or how it failed.
    pub async fn ended(&mut self) -> String {
        match self.set.join_next().await {
            Some(Ok(name)) => format!("{name} returned"),
            Some(Err(e)) if e.is_panic() => "a task panicked".to_string(),
            Some(Err(_)) => "a task was cancelled".to_string(),
            // With nothing to run there is nothing to serve.
            None => "no tasks".to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_first_task_to_end_is_named() {
        let mut tasks = Tasks::default();
        tasks.spawn("forever".into(), std::future::pending());
        tasks.spawn("short".into(), async {});
        assert_eq!(tasks.ended().await, "short returned");
        let mut tasks = Tasks::default();
        tasks.spawn("panics".into(), async { panic!("on purpose") });
        assert_eq!(tasks.ended().await, "a task panicked");
        assert_eq!(Tasks::default().ended().await, "no tasks");
    }
}
