//! Our own programs as the processes behind kwok's pods.
//!
//! kwok keeps pods "running" without running anything. [`PodRunner`] plays
//! the kubelet for the pods it selects: for each one with an IP it starts a
//! program with the environment and arguments of the pod's first container
//! (values and the downward-API fields a kubelet would fill in, `$(VAR)`
//! expanded in the arguments), stops it when the pod goes, and deletes the
//! pod when the program exits, as a pod whose only container ended is gone
//! for good under `restartPolicy: Never`.
//!
//! One thing differs from a node: every pod shares the loopback, so the
//! runner tells the program to listen on its pod's IP (`TIDEPOOL_LISTEN`,
//! the pod IP and the container's first port).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Container, Pod};
use kube::api::{Api, DeleteParams};
use kube::runtime::watcher::{self, Event};
use kube::{Client, ResourceExt};

use crate::process::Managed;

/// The pods with a live process, by name.
type Running = Arc<Mutex<HashSet<String>>>;

/// Runs a program behind every selected pod until dropped.
pub struct PodRunner {
    running: Running,
    task: tokio::task::JoinHandle<()>,
}

impl PodRunner {
    /// Starts `program` behind each pod in `namespace` that matches the
    /// label `selector`; logs go to `<dir>/pod-<name>.log`.
    pub fn start(client: Client, namespace: &str, selector: &str, program: PathBuf, dir: PathBuf) -> Self {
        let running = Running::default();
        let pods: Api<Pod> = Api::namespaced(client, namespace);
        let config = watcher::Config::default().labels(selector);
        let task = tokio::spawn(run(pods, config, program, dir, running.clone()));
        Self { running, task }
    }

    /// The pods whose process is running.
    pub fn running(&self) -> Vec<String> {
        let mut names: Vec<String> = self.running.lock().map(|r| r.iter().cloned().collect()).unwrap_or_default();
        names.sort();
        names
    }
}

impl Drop for PodRunner {
    fn drop(&mut self) {
        // Aborting drops the task's processes, which stops them.
        self.task.abort();
    }
}

async fn run(pods: Api<Pod>, config: watcher::Config, program: PathBuf, dir: PathBuf, running: Running) {
    let mut processes: HashMap<String, Managed> = HashMap::new();
    // The pods a relist has shown so far; the others went during a watch gap.
    let mut relisted: Option<HashSet<String>> = None;
    let mut events = watcher::watcher(pods.clone(), config).boxed();
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        tokio::select! {
            event = events.next() => match event {
                Some(Ok(Event::Apply(pod) | Event::InitApply(pod))) => {
                    if let Some(seen) = &mut relisted {
                        seen.insert(pod.name_any());
                    }
                    if pod.metadata.deletion_timestamp.is_some() {
                        stop(&mut processes, &pod.name_any());
                    } else if !processes.contains_key(&pod.name_any())
                        && let Some(process) = start(&pod, &program, &dir)
                    {
                        processes.insert(pod.name_any(), process);
                    }
                }
                Some(Ok(Event::Delete(pod))) => stop(&mut processes, &pod.name_any()),
                Some(Ok(Event::Init)) => relisted = Some(HashSet::new()),
                Some(Ok(Event::InitDone)) => {
                    let seen = relisted.take().unwrap_or_default();
                    let gone: Vec<String> = processes.keys().filter(|n| !seen.contains(*n)).cloned().collect();
                    gone.iter().for_each(|name| stop(&mut processes, name));
                }
                Some(Err(e)) => {
                    eprintln!("[pod-runner] watch: {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                None => return,
            },
            _ = tick.tick() => {
                let ended: Vec<String> = processes
                    .iter_mut()
                    .filter_map(|(name, process)| process.check_running().is_err().then(|| name.clone()))
                    .collect();
                for name in ended {
                    processes.remove(&name);
                    // The program ended: so does its pod, as under a kubelet.
                    let params = DeleteParams { grace_period_seconds: Some(0), ..DeleteParams::default() };
                    if let Err(e) = pods.delete(&name, &params).await {
                        eprintln!("[pod-runner] deleting pod {name} whose process ended: {e}");
                    }
                }
            }
        }
        if let Ok(mut names) = running.lock() {
            *names = processes.keys().cloned().collect();
        }
    }
}

/// Stops a pod's process off the runtime's threads: stopping waits up to
/// its grace period.
fn stop(processes: &mut HashMap<String, Managed>, name: &str) {
    if let Some(mut process) = processes.remove(name) {
        tokio::task::spawn_blocking(move || process.stop(Duration::from_secs(2)));
    }
}

/// Starts the program for a pod that has an IP; None until it has one.
fn start(pod: &Pod, program: &std::path::Path, dir: &std::path::Path) -> Option<Managed> {
    let ip = pod.status.as_ref()?.pod_ip.clone()?;
    let container = pod.spec.as_ref()?.containers.first()?;
    let env = environment(pod, container, &ip);
    let args: Vec<String> = container.args.iter().flatten().map(|a| expand(a, &env)).collect();
    let env: Vec<(String, String)> = env.into_iter().collect();
    match Managed::spawn_with_env(&format!("pod-{}", pod.name_any()), program, &args, &env, dir) {
        Ok(process) => Some(process),
        Err(e) => {
            eprintln!("[pod-runner] starting the process of pod {}: {e}", pod.name_any());
            None
        }
    }
}

/// The container's environment as a kubelet would give it, plus the address
/// to listen on.
fn environment(pod: &Pod, container: &Container, ip: &str) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    for var in container.env.iter().flatten() {
        let value = match (&var.value, var.value_from.as_ref().and_then(|f| f.field_ref.as_ref())) {
            (Some(value), _) => Some(value.clone()),
            (None, Some(field)) => match field.field_path.as_str() {
                "metadata.name" => Some(pod.name_any()),
                "metadata.namespace" => pod.namespace(),
                "status.podIP" => Some(ip.to_string()),
                "spec.nodeName" => pod.spec.as_ref().and_then(|s| s.node_name.clone()),
                other => {
                    eprintln!("[pod-runner] pod {}: field {other} is not filled in here", pod.name_any());
                    None
                }
            },
            (None, None) => Some(String::new()),
        };
        if let Some(value) = value {
            env.insert(var.name.clone(), expand(&value, &env));
        }
    }
    let port = container.ports.iter().flatten().next().map_or(8080, |p| p.container_port);
    env.insert("TIDEPOOL_LISTEN".into(), format!("{ip}:{port}"));
    env
}

/// Expands `$(NAME)` from `env`, leaving unknown names as they are, and `$$`
/// as `$`, as Kubernetes does.
fn expand(text: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if let Some(stripped) = after.strip_prefix('$') {
            out.push('$');
            rest = stripped;
        } else if let Some(inner) = after.strip_prefix('(')
            && let Some(end) = inner.find(')')
            && let Some(value) = env.get(&inner[..end])
        {
            out.push_str(value);
            rest = &inner[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expands_like_kubernetes() {
        let env = BTreeMap::from([("A".to_string(), "1".to_string())]);
        assert_eq!(expand("--x=$(A)", &env), "--x=1");
        assert_eq!(expand("$(B) $$(A) $", &env), "$(B) $(A) $");
    }
}
