//! What the harness benchmarks share. Each uses part of it.
#![allow(dead_code)]

use std::time::Duration;

use kube::Client;
use kube::api::{Api, Patch, PatchParams};
use tidepool_crds::WarmPool;
use tidepool_tests::eventually;

/// Applies the WarmPool `edge` in `default` with `size` warm pods (kwok
/// pods the operator places, as small as a pod gets) and waits until it
/// holds exactly that many, all warm.
pub async fn pool(admin: &Client, size: i32) {
    let pools: Api<WarmPool> = Api::namespaced(admin.clone(), "default");
    let pool = serde_json::json!({
        "apiVersion": tidepool_crds::API_VERSION, "kind": "WarmPool",
        "metadata": { "name": "edge" },
        "spec": {
            "size": size, "maxSize": 5000, "nodeAssignment": "Operator",
            "tier": { "vcpu": 1, "memoryMiB": 64 },
            "template": { "spec": { "containers": [{
                "name": "session", "image": "tidepool/session:bench",
                "ports": [{ "containerPort": 9000 }],
                "resources": { "requests": { "cpu": "1m", "memory": "1Mi" } }
            }] } }
        }
    });
    pools.patch("edge", &PatchParams::apply("bench").force(), &Patch::Apply(&pool)).await.expect("pool");
    eventually(Duration::from_secs(600), "the pool to reach its size", || async {
        let status = pools.get("edge").await.ok()?.status?;
        (status.warm == size && status.replicas == size).then_some(())
    })
    .await
    .expect("pool at size");
}

/// User plus system CPU time of a process so far, in seconds: fields 14 and
/// 15 of `/proc/<pid>/stat` (11 and 12 after the command name, which may
/// hold spaces), in clock ticks of 100 a second.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}
