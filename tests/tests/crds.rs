//! The CRDs on a real API server: they install, `kubectl get` shows their
//! columns, `kubectl scale` works, and bad objects are refused by name.

use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::{Value, json};
use tidepool_tests::{ControlPlane, Options};

fn resource(kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk("tidepool.dev", "v1alpha1", kind), plural)
}

fn warm_pool() -> Value {
    json!({
        "apiVersion": "tidepool.dev/v1alpha1", "kind": "WarmPool",
        "metadata": { "name": "edge" },
        "spec": {
            "size": 3,
            "tier": { "vcpu": 1, "memoryMiB": 256 },
            "template": { "spec": { "containers": [{ "name": "session", "image": "tidepool/session:0.1.0" }] } }
        }
    })
}

fn test_session() -> Value {
    json!({
        "apiVersion": "tidepool.dev/v1alpha1", "kind": "TestSession",
        "metadata": { "name": "alice" },
        "spec": {
            "pool": "edge", "profile": "bufferbloat", "ttlSeconds": 120, "stickyKey": "alice",
            "client": { "address": "192.0.2.10", "latitude": 52.37, "longitude": 4.89 },
            "probes": [
                { "type": "http", "url": "https://example.com/" },
                { "type": "tcp", "host": "example.com", "port": 443 },
                { "type": "dns", "host": "example.com" }
            ]
        }
    })
}

fn backend() -> Value {
    json!({
        "apiVersion": "tidepool.dev/v1alpha1", "kind": "Backend",
        "metadata": { "name": "edge-ams-1" },
        "spec": {
            "kind": "external", "address": "203.0.113.7:8443", "region": "ams",
            "coordinates": { "latitude": 52.37, "longitude": 4.89 },
            "healthCheck": { "type": "http", "port": 8443, "path": "/healthz" }
        }
    })
}

fn tube() -> Value {
    json!({
        "apiVersion": "tidepool.dev/v1alpha1", "kind": "Tube",
        "metadata": { "name": "db" },
        "spec": {
            "session": "alice", "conversationType": "tunnel",
            "target": { "host": "postgres.default.svc", "port": 5432 },
            "offer": "dj0wDQpvPS0gNDYxMTczMTQwMDAgMiBJTiBJUDQgMTI3LjAuMC4xDQo=",
            "iceServers": [{ "urls": ["stun:stun.example.org:3478"] }]
        }
    })
}

/// Creates `object` and returns the API server's refusal: its message and the
/// fields its causes name. Panics if the object was accepted.
async fn refusal(client: &kube::Client, object: &Value) -> (String, Vec<String>) {
    let kind = object["kind"].as_str().unwrap();
    let plural = format!("{}s", kind.to_lowercase());
    let ar = resource(kind, &plural);
    let api: Api<DynamicObject> = if kind == "Backend" {
        Api::all_with(client.clone(), &ar)
    } else {
        Api::namespaced_with(client.clone(), "default", &ar)
    };
    let object: DynamicObject = serde_json::from_value(object.clone()).unwrap();
    match api.create(&PostParams::default(), &object).await {
        Ok(_) => panic!("the API server accepted an invalid {kind}: {object:?}"),
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 422, "{kind}: expected 422 Unprocessable, got {status:?}");
            let fields = status.details.iter().flat_map(|d| d.causes.iter().map(|c| c.field.clone())).collect();
            (status.message, fields)
        }
        Err(e) => panic!("unexpected error creating {kind}: {e}"),
    }
}

fn with(mut base: Value, pointer: &str, value: Value) -> Value {
    let (parent, key) = pointer.rsplit_once('/').unwrap();
    let target = base.pointer_mut(parent).unwrap_or_else(|| panic!("no {parent}"));
    if value.is_null() {
        target.as_object_mut().unwrap().remove(key);
    } else if let Ok(index) = key.parse::<usize>() {
        target[index] = value;
    } else {
        target[key] = value;
    }
    base
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crds_install_and_kubectl_shows_their_columns() {
    let plane = ControlPlane::start_with(Options { nodes: vec![], ..Options::default() }).await.unwrap();
    let client = plane.client().await.unwrap();
    for object in [warm_pool(), test_session(), tube()] {
        let kind = object["kind"].as_str().unwrap().to_string();
        let api: Api<DynamicObject> =
            Api::namespaced_with(client.clone(), "default", &resource(&kind, &format!("{}s", kind.to_lowercase())));
        api.create(&PostParams::default(), &serde_json::from_value(object).unwrap()).await.unwrap();
    }
    let backends: Api<DynamicObject> = Api::all_with(client.clone(), &resource("Backend", "backends"));
    backends.create(&PostParams::default(), &serde_json::from_value(backend()).unwrap()).await.unwrap();

    let get = |args: &[&str]| {
        let out = plane.kubectl().args(args).output().unwrap();
        assert!(out.status.success(), "kubectl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let header =
        |text: &str| text.lines().next().unwrap_or_default().split_whitespace().map(String::from).collect::<Vec<_>>();
    assert_eq!(header(&get(&["get", "wp"])), ["NAME", "SIZE", "WARM", "ASSIGNED", "PENDING", "READY", "AGE"]);
    assert_eq!(header(&get(&["get", "ts"])), ["NAME", "PHASE", "POOL", "POD", "NODE", "GRADE", "AGE"]);
    assert_eq!(
        header(&get(&["get", "be"])),
        ["NAME", "KIND", "REGION", "CPU%", "MEM%", "GPU%", "HEALTH", "READY", "AGE"]
    );
    assert_eq!(
        header(&get(&["get", "tubes"])),
        ["NAME", "TYPE", "SESSION", "STATE", "RTT(MS)", "CONNS", "ENDED", "AGE"]
    );
    // Use figures are whole percentages in the table, whatever the status holds.
    let usage = json!({ "status": { "usage": {
        "cpuPercent": 37.816_254_1, "perCorePercent": [37.816_254_1], "memoryPercent": 61.499_999_9,
        "diskPercent": 5.0, "gpuPercent": 99.9
    } } });
    backends.patch_status("edge-ams-1", &PatchParams::default(), &Patch::Merge(&usage)).await.unwrap();
    let row: Vec<String> =
        get(&["get", "be", "edge-ams-1", "--no-headers"]).split_whitespace().map(String::from).collect();
    assert_eq!(row[3..6], ["37", "61", "99"], "{row:?}");
    assert!(get(&["get", "ts", "alice"]).contains("edge"));
    assert!(get(&["get", "tidepool"]).contains("warmpool.tidepool.dev/edge"), "the tidepool category lists our kinds");

    // The scale subresource: kubectl scale writes spec.size.
    get(&["scale", "wp/edge", "--replicas=5"]);
    let pools: Api<DynamicObject> = Api::namespaced_with(client.clone(), "default", &resource("WarmPool", "warmpools"));
    assert_eq!(pools.get("edge").await.unwrap().data["spec"]["size"], 5);

    // Defaults are applied by the API server.
    let pool = pools.get("edge").await.unwrap();
    assert_eq!(pool.data["spec"]["sessionTTLSeconds"], 300);
    assert_eq!(pool.data["spec"]["placement"]["gpu"], 1.5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_server_refuses_bad_objects_and_names_the_field() {
    let plane = ControlPlane::start_with(Options { nodes: vec![], ..Options::default() }).await.unwrap();
    let client = plane.client().await.unwrap();
    let cases: Vec<(&str, Value, &str)> = vec![
        ("negative size", with(warm_pool(), "/spec/size", json!(-1)), "spec.size"),
        ("no tier", with(warm_pool(), "/spec/tier", Value::Null), "spec.tier"),
        ("zero vCPU", with(warm_pool(), "/spec/tier/vcpu", json!(0)), "spec.tier.vcpu"),
        (
            "GPU memory without GPUs",
            with(warm_pool(), "/spec/tier/gpuMemoryMiB", json!(8192)),
            "spec.tier.gpuMemoryMiB",
        ),
        ("max below size", with(warm_pool(), "/spec/maxSize", json!(1)), "spec.maxSize"),
        (
            "template with an empty container list",
            with(warm_pool(), "/spec/template/spec/containers", json!([])),
            "spec.template.spec.containers",
        ),
        (
            "template without containers",
            with(warm_pool(), "/spec/template/spec", json!({})),
            "spec.template.spec.containers",
        ),
        ("unknown profile", with(test_session(), "/spec/profile", json!("speedy")), "spec.profile"),
        ("zero TTL", with(test_session(), "/spec/ttlSeconds", json!(0)), "spec.ttlSeconds"),
        ("pool name not a DNS name", with(test_session(), "/spec/pool", json!("Edge_Pool")), "spec.pool"),
        (
            "latitude without longitude",
            with(test_session(), "/spec/client/longitude", Value::Null),
            "spec.client.latitude",
        ),
        (
            "client address not an IP",
            with(test_session(), "/spec/client/address", json!("my-laptop")),
            "spec.client.address",
        ),
        ("probe port out of range", with(test_session(), "/spec/probes/1/port", json!(70000)), "spec.probes[1].port"),
        (
            "http probe without url",
            with(test_session(), "/spec/probes/0", json!({ "type": "http", "host": "example.com" })),
            "spec.probes[0].url",
        ),
        ("unknown probe type", with(test_session(), "/spec/probes/2/type", json!("smtp")), "spec.probes[2].type"),
        (
            "node backend without nodeName",
            with(with(backend(), "/spec/kind", json!("node")), "/spec/address", Value::Null),
            "spec.nodeName",
        ),
        (
            "latitude beyond the pole",
            with(backend(), "/spec/coordinates/latitude", json!(123.0)),
            "spec.coordinates.latitude",
        ),
        (
            "health timeout not below interval",
            with(backend(), "/spec/healthCheck/timeoutSeconds", json!(10)),
            "spec.healthCheck.timeoutSeconds",
        ),
        ("offer not base64", with(tube(), "/spec/offer", json!("v=0 o=- not base64!")), "spec.offer"),
        ("tunnel without target", with(tube(), "/spec/target", Value::Null), "spec.target"),
        ("target port zero", with(tube(), "/spec/target/port", json!(0)), "spec.target.port"),
        ("both session and pool", with(tube(), "/spec/pool", json!("edge")), "spec.pool"),
        ("neither session nor pool", with(tube(), "/spec/session", Value::Null), "spec.session"),
        (
            "ICE URL not stun or turn",
            with(tube(), "/spec/iceServers/0/urls/0", json!("http://stun.example.org")),
            "spec.iceServers[0].urls[0]",
        ),
        ("unknown conversation type", with(tube(), "/spec/conversationType", json!("rdp")), "spec.conversationType"),
    ];
    let mut failures = Vec::new();
    for (name, object, field) in &cases {
        // The cause's field (from the schema path or the rule's fieldPath) must
        // be exactly the offending field, not just appear in our own message.
        let (message, fields) = refusal(&client, object).await;
        if !fields.iter().any(|f| f == field) || !message.contains(field) {
            failures.push(format!("{name}: expected the field {field}, got causes {fields:?}: {message}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // A session's spec cannot change once created.
    let sessions: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), "default", &resource("TestSession", "testsessions"));
    sessions.create(&PostParams::default(), &serde_json::from_value(test_session()).unwrap()).await.unwrap();
    let change = json!({ "spec": { "pool": "other" } });
    match sessions.patch("alice", &PatchParams::default(), &Patch::Merge(&change)).await {
        Err(kube::Error::Api(status)) => assert!(status.message.contains("immutable"), "{}", status.message),
        other => panic!("changing a session's spec was not refused: {other:?}"),
    }
    // Nor a tube's: a tube answered for one session, target and kind stays theirs.
    let tubes: Api<DynamicObject> = Api::namespaced_with(client.clone(), "default", &resource("Tube", "tubes"));
    tubes.create(&PostParams::default(), &serde_json::from_value(tube()).unwrap()).await.unwrap();
    let change = json!({ "spec": { "target": { "host": "elsewhere.example", "port": 22 } } });
    match tubes.patch("db", &PatchParams::default(), &Patch::Merge(&change)).await {
        Err(kube::Error::Api(status)) => assert!(status.message.contains("immutable"), "{}", status.message),
        other => panic!("changing a tube's spec was not refused: {other:?}"),
    }
}
