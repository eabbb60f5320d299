//! The agent DaemonSet: built from the operator's own settings and kept as
//! built. Upgrading the operator (a new agent image or setting) rolls the
//! agents; a deleted or edited DaemonSet is put back.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::DaemonSet;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::watcher::{self, Event};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};

use crate::labels;

/// The one host path the agent mounts: an empty directory of the agent's own
/// on the kubelet's filesystem, which holds the pods' ephemeral storage.
/// statvfs of it gives that filesystem's size and use; nothing else of the
/// node is visible through it (the kubelet directory itself holds every
/// pod's Secret volumes, so it is not mounted).
const DISK_HOST_PATH: &str = "/var/lib/kubelet/tidepool-agent";
/// Where the agent sees [`DISK_HOST_PATH`].
const DISK_MOUNT_PATH: &str = "/host/kubelet-disk";

/// What the agents run with.
#[derive(Clone, Debug, PartialEq)]
pub struct AgentSettings {
    pub name: String,
    pub namespace: String,
    pub image: String,
    pub service_account: String,
    /// Where agents send reports: the operator's Service.
    pub operator_url: String,
    pub token_audience: String,
    pub report_interval_ms: u32,
    pub windows: String,
    /// The port of the agent's /metrics and /healthz on the node.
    pub port: u16,
    pub node_selector: BTreeMap<String, String>,
    /// A RuntimeClass for NVML access on GPU nodes, if the cluster needs one.
    pub runtime_class: Option<String>,
}

/// The DaemonSet, as a server-side apply body.
pub fn build(settings: &AgentSettings) -> Value {
    let mut body = body(settings);
    if settings.runtime_class.is_none()
        && let Some(pod) = body.pointer_mut("/spec/template/spec").and_then(Value::as_object_mut)
    {
        pod.remove("runtimeClassName");
    }
    body
}

fn body(settings: &AgentSettings) -> Value {
    let selector = json!({ "app.kubernetes.io/name": "tidepool-agent", "app.kubernetes.io/instance": settings.name });
    let mut pod_labels = selector.clone();
    pod_labels["app.kubernetes.io/managed-by"] = json!(labels::MANAGER);
    let field = |path: &str| json!({ "fieldRef": { "fieldPath": path } });
    let listen = format!("0.0.0.0:{}", settings.port);
    json!({
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": {
            "name": settings.name,
            "namespace": settings.namespace,
            "labels": pod_labels,
            "annotations": { "tidepool.dev/operator-version": env!("CARGO_PKG_VERSION") },
        },
        "spec": {
            "selector": { "matchLabels": selector },
            "updateStrategy": { "type": "RollingUpdate", "rollingUpdate": { "maxUnavailable": "10%" } },
            "template": {
                "metadata": { "labels": pod_labels },
                "spec": {
                    "serviceAccountName": settings.service_account,
                    // The agent needs no Kubernetes API: only its audience-bound token below.
                    "automountServiceAccountToken": false,
                    // Node address and network counters are the node's own: with
                    // the host network, the container's /proc/net/dev is the
                    // node's, and /proc/stat and /proc/meminfo are node-wide
                    // anyway, so the host's /proc is not mounted.
                    "hostNetwork": true,
                    "dnsPolicy": "ClusterFirstWithHostNet",
                    "priorityClassName": "system-node-critical",
                    // Every node, tainted or not, hosts sessions or could.
                    "tolerations": [{ "operator": "Exists" }],
                    "nodeSelector": settings.node_selector,
                    "runtimeClassName": settings.runtime_class,
                    "securityContext": {
                        "runAsNonRoot": true,
                        "runAsUser": 65532,
                        "runAsGroup": 65532,
                        "seccompProfile": { "type": "RuntimeDefault" },
                    },
                    "containers": [{
                        "name": "agent",
                        "image": settings.image,
                        "args": [
                            "--operator-url", settings.operator_url,
                            "--token-file", "/var/run/secrets/tidepool/token",
                            "--listen", listen,
                            "--proc-root", "/proc",
                            "--disk-path", DISK_MOUNT_PATH,
                            "--report-interval-ms", settings.report_interval_ms.to_string(),
                            "--windows", settings.windows,
                        ],
                        "env": [
                            { "name": "NODE_NAME", "valueFrom": field("spec.nodeName") },
                            { "name": "TIDEPOOL_AGENT_ADDRESS", "valueFrom": field("status.hostIP") },
                            // With the NVIDIA container runtime these expose NVML and nothing more.
                            { "name": "NVIDIA_VISIBLE_DEVICES", "value": "all" },
                            { "name": "NVIDIA_DRIVER_CAPABILITIES", "value": "utility" },
                        ],
                        "ports": [{ "name": "metrics", "containerPort": settings.port, "protocol": "TCP" }],
                        "livenessProbe": { "httpGet": { "path": "/healthz", "port": "metrics" }, "periodSeconds": 10 },
                        "readinessProbe": { "httpGet": { "path": "/healthz", "port": "metrics" }, "periodSeconds": 5 },
                        "resources": {
                            "requests": { "cpu": "10m", "memory": "16Mi" },
                            "limits": { "memory": "64Mi" },
                        },
                        "securityContext": {
                            "allowPrivilegeEscalation": false,
                            "readOnlyRootFilesystem": true,
                            "capabilities": { "drop": ["ALL"] },
                        },
                        "volumeMounts": [
                            { "name": "kubelet-disk", "mountPath": DISK_MOUNT_PATH, "readOnly": true },
                            { "name": "token", "mountPath": "/var/run/secrets/tidepool", "readOnly": true },
                        ],
                    }],
                    "volumes": [
                        { "name": "kubelet-disk", "hostPath": { "path": DISK_HOST_PATH, "type": "DirectoryOrCreate" } },
                        { "name": "token", "projected": { "sources": [{ "serviceAccountToken": {
                            "audience": settings.token_audience,
                            "expirationSeconds": 3600,
                            "path": "token",
                        } }] } },
                    ],
                },
            },
        },
    })
}

/// Applies the DaemonSet, then re-applies it whenever someone changes its
/// spec or deletes it. Runs while this replica leads.
pub async fn keep(watch_client: Client, client: Client, settings: AgentSettings) {
    let api: Api<DaemonSet> = Api::namespaced(client, &settings.namespace);
    let body = build(&settings);
    let params = PatchParams::apply(labels::MANAGER).force();
    let mut generation: Option<i64> = None;
    let config = watcher::Config::default().fields(&format!("metadata.name={}", settings.name));
    let watched: Api<DaemonSet> = Api::namespaced(watch_client, &settings.namespace);
    let mut events = watcher::watcher(watched, config).boxed();
    // Apply first, whatever is there.
    let mut apply_now = true;
    // A relist (after a dropped watch) that does not list the DaemonSet
    // means it was deleted while we were not watching.
    let mut listed = false;
    loop {
        if apply_now {
            match api.patch(&settings.name, &params, &Patch::Apply(&body)).await {
                Ok(applied) => {
                    generation = applied.metadata.generation;
                    tracing::info!(daemonset = %settings.name, image = %settings.image, "agent DaemonSet applied");
                }
                Err(e) => {
                    tracing::warn!(error = %e, "applying the agent DaemonSet failed; retrying");
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    continue;
                }
            }
            apply_now = false;
        }
        match events.next().await {
            // A status update keeps the generation; a spec edit bumps it.
            Some(Ok(Event::Apply(ds) | Event::InitApply(ds))) => {
                listed = true;
                if ds.metadata.generation != generation {
                    tracing::info!(daemonset = %ds.name_any(), "the agent DaemonSet was changed; putting it back");
                    apply_now = true;
                }
            }
            Some(Ok(Event::Init)) => listed = false,
            Some(Ok(Event::InitDone)) => {
                if !listed {
                    tracing::info!("the agent DaemonSet is gone; making it again");
                    apply_now = true;
                }
            }
            Some(Ok(Event::Delete(_))) => {
                tracing::info!("the agent DaemonSet was deleted; making it again");
                apply_now = true;
            }
            Some(Err(e)) => {
                tracing::debug!(error = %e, "DaemonSet watch error");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            None => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> AgentSettings {
        AgentSettings {
            name: "tidepool-agent".into(),
            namespace: "tidepool".into(),
            image: "tidepool-agent:1".into(),
            service_account: "tidepool-agent".into(),
            operator_url: "http://tidepool-operator.tidepool:8080".into(),
            token_audience: "tidepool".into(),
            report_interval_ms: 1000,
            windows: "10s,60s,15m".into(),
            port: 9101,
            node_selector: BTreeMap::new(),
            runtime_class: None,
        }
    }

    #[test]
    fn the_daemonset_parses_and_carries_the_settings() {
        let body = build(&settings());
        let ds: DaemonSet = serde_json::from_value(body).expect("a valid DaemonSet");
        let pod = ds.spec.unwrap().template.spec.unwrap();
        let agent = &pod.containers[0];
        assert_eq!(agent.image.as_deref(), Some("tidepool-agent:1"));
        let args = agent.args.clone().unwrap();
        let after = |flag: &str| args[args.iter().position(|a| a == flag).unwrap() + 1].clone();
        assert_eq!(after("--operator-url"), "http://tidepool-operator.tidepool:8080");
        assert_eq!(after("--listen"), "0.0.0.0:9101");
        assert_eq!(pod.service_account_name.as_deref(), Some("tidepool-agent"));
        assert_eq!(pod.automount_service_account_token, Some(false));
        let security = agent.security_context.as_ref().unwrap();
        assert_eq!(security.read_only_root_filesystem, Some(true));
        assert_eq!(security.capabilities.as_ref().unwrap().drop.as_deref(), Some(&["ALL".to_string()][..]));
        let token = pod.volumes.unwrap().into_iter().find(|v| v.name == "token").unwrap();
        let source = &token.projected.unwrap().sources.unwrap()[0];
        assert_eq!(source.service_account_token.as_ref().unwrap().audience.as_deref(), Some("tidepool"));
    }

    /// The agent reads /proc/stat, /proc/meminfo and /proc/net/dev, which its
    /// own /proc shows node-wide on the host network, and statvfs of one
    /// directory: it must not see the node's root or /proc again.
    #[test]
    fn the_agent_mounts_only_its_disk_directory_read_only() {
        let ds: DaemonSet = serde_json::from_value(build(&settings())).expect("a valid DaemonSet");
        let pod = ds.spec.unwrap().template.spec.unwrap();
        assert_eq!(pod.host_network, Some(true), "/proc/net/dev is the node's only on the host network");
        let volumes = pod.volumes.clone().unwrap();
        let host_paths: Vec<(&str, &str, Option<&str>)> = volumes
            .iter()
            .filter_map(|v| {
                let host = v.host_path.as_ref()?;
                Some((v.name.as_str(), host.path.as_str(), host.type_.as_deref()))
            })
            .collect();
        assert_eq!(
            host_paths,
            [("kubelet-disk", "/var/lib/kubelet/tidepool-agent", Some("DirectoryOrCreate"))],
            "the agent mounts more of the node than its disk directory"
        );
        let agent = &pod.containers[0];
        for mount in agent.volume_mounts.as_ref().unwrap() {
            assert_eq!(mount.read_only, Some(true), "{} is mounted writable", mount.name);
            assert_eq!(mount.mount_propagation, None, "{} sees the host's later mounts", mount.name);
        }
        let disk_mount = agent.volume_mounts.as_ref().unwrap().iter().find(|m| m.name == "kubelet-disk").unwrap();
        let args = agent.args.clone().unwrap();
        let after = |flag: &str| args[args.iter().position(|a| a == flag).unwrap() + 1].clone();
        assert_eq!(after("--disk-path"), disk_mount.mount_path);
        assert_eq!(after("--proc-root"), "/proc");
    }
}
