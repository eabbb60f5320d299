//! The chart's ValidatingAdmissionPolicy on a real API server. A WarmPool's
//! template is a pod the operator creates with its own rights, so a template
//! that asks for privilege, the node's namespaces, files or ports, or a
//! ServiceAccount its namespace does not allow is refused, with a message
//! that names the field. The chart's own pool, the example in
//! tests/examples and hardened pools with an allowed account are accepted.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::{Value, json};
use tidepool_tests::control_plane::bin_dir;
use tidepool_tests::{ControlPlane, Options, eventually};

/// The release namespace: the chart's session account is allowed here only.
const RELEASE_NAMESPACE: &str = "tidepool";
/// A pool namespace that allows two accounts of its own by annotation.
const TEAM: &str = "team-a";
/// A pool namespace with no annotation.
const OTHER_TEAM: &str = "team-b";
const ALLOWED_ACCOUNTS: &str = "tidepool.dev/session-service-accounts";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `helm template` of one of the chart's templates, as the release `tidepool`.
fn template(show: &str, extra: &[&str]) -> String {
    let output = Command::new(bin_dir().unwrap().join("helm"))
        .args(["template", "tidepool"])
        .arg(repo().join("helm/tidepool"))
        .args(["--namespace", RELEASE_NAMESPACE, "--kube-version", "1.36.3", "--show-only", show])
        .args(extra)
        .output()
        .unwrap();
    assert!(output.status.success(), "helm template: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout).unwrap()
}

fn warm_pools(client: &kube::Client, namespace: &str) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("tidepool.dev", "v1alpha1", "WarmPool");
    Api::namespaced_with(client.clone(), namespace, &ApiResource::from_gvk_with_plural(&gvk, "warmpools"))
}

/// The chart's example pool, as `name` in `namespace`.
fn chart_pool(name: &str, namespace: &str) -> Value {
    let rendered: Value = serde_yaml::from_str(&template("templates/warmpool.yaml", &[])).unwrap();
    let mut pool = serde_json::to_value(rendered).unwrap();
    pool["metadata"] = json!({ "name": name, "namespace": namespace });
    pool
}

/// The chart's pool in `namespace` with `change` made to its pod spec.
fn pool_with(namespace: &str, change: impl FnOnce(&mut Value)) -> Value {
    let mut pool = chart_pool("changed", namespace);
    let spec = &mut pool["spec"]["template"]["spec"];
    spec.as_object_mut().unwrap().remove("serviceAccountName");
    change(spec);
    pool
}

fn hardened(name: &str) -> Value {
    json!({
        "name": name, "image": "tidepool-session:0.1.0",
        "securityContext": { "allowPrivilegeEscalation": false, "capabilities": { "drop": ["ALL"] } }
    })
}

/// What the API server says to creating `pool` (a dry run unless `keep`):
/// None when it is accepted, else the refusal's code and message.
async fn answer(client: &kube::Client, pool: &Value, keep: bool) -> Option<(u16, String)> {
    let namespace = pool["metadata"]["namespace"].as_str().unwrap();
    let object: DynamicObject = serde_json::from_value(pool.clone()).unwrap();
    let params = PostParams { dry_run: !keep, ..PostParams::default() };
    match warm_pools(client, namespace).create(&params, &object).await {
        Ok(_) => None,
        Err(kube::Error::Api(status)) => Some((status.code, status.message)),
        Err(e) => panic!("creating a WarmPool: {e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_pools_that_could_escalate_are_refused_naming_the_field() {
    // The controller-manager writes the policy's type check into its status.
    let options = Options { scheduler: false, kwok: false, nodes: vec![], ..Options::default() };
    let plane = ControlPlane::start_with(options).await.unwrap();
    let client = plane.client().await.unwrap();
    for namespace in [RELEASE_NAMESPACE, TEAM, OTHER_TEAM] {
        let out = plane.kubectl().args(["create", "namespace", namespace]).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    // Spaces around the names are allowed.
    let annotation = format!("{ALLOWED_ACCOUNTS}=probe-runner, tracer");
    let out = plane.kubectl().args(["annotate", "namespace", TEAM, &annotation]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // Off by value: nothing rendered.
    let off = Command::new(bin_dir().unwrap().join("helm"))
        .args(["template", "tidepool"])
        .arg(repo().join("helm/tidepool"))
        .args(["--set", "admissionPolicy.enabled=false", "--show-only", "templates/admission-policy.yaml"])
        .output()
        .unwrap();
    assert!(!off.status.success(), "admissionPolicy.enabled=false still renders the policy");

    let policy = template("templates/admission-policy.yaml", &[]);
    let manifest = plane.dir().join("admission-policy.yaml");
    std::fs::write(&manifest, &policy).unwrap();
    let out = plane.kubectl().args(["apply", "-f"]).arg(&manifest).output().unwrap();
    assert!(out.status.success(), "the policy: {}", String::from_utf8_lossy(&out.stderr));

    // The API server takes a moment to load a new policy.
    let privileged =
        pool_with(RELEASE_NAMESPACE, |spec| spec["containers"][0]["securityContext"]["privileged"] = json!(true));
    eventually(Duration::from_secs(30), "the policy to refuse a privileged pool", || async {
        answer(&client, &privileged, false).await
    })
    .await
    .unwrap();

    // The API server type-checks the policy against the WarmPool schema: no warnings.
    let status = eventually(Duration::from_secs(30), "the policy's type check", || async {
        let out = plane
            .kubectl()
            .args(["get", "validatingadmissionpolicy", "tidepool-warmpool-templates", "-o=jsonpath={.status}"])
            .output()
            .ok()?;
        let status = String::from_utf8_lossy(&out.stdout).to_string();
        status.contains("typeChecking").then_some(status)
    })
    .await
    .unwrap();
    assert!(!status.contains("expressionWarnings"), "the policy's type check: {status}");

    let field = "spec.template.spec";
    let cases: Vec<(&str, Value)> = vec![
        (
            "containers[0].securityContext.privileged is true",
            pool_with(RELEASE_NAMESPACE, |spec| spec["containers"][0]["securityContext"]["privileged"] = json!(true)),
        ),
        (
            "initContainers[1].securityContext.privileged is true",
            pool_with(TEAM, |spec| {
                let mut bad = hardened("bad");
                bad["securityContext"]["privileged"] = json!(true);
                spec["initContainers"] = json!([hardened("setup"), bad]);
            }),
        ),
        (
            "containers[1].securityContext.allowPrivilegeEscalation is true",
            pool_with(TEAM, |spec| {
                let mut sidecar = hardened("sidecar");
                sidecar["securityContext"]["allowPrivilegeEscalation"] = json!(true);
                spec["containers"].as_array_mut().unwrap().push(sidecar);
            }),
        ),
        (
            "initContainers[0].securityContext.allowPrivilegeEscalation is true",
            pool_with(TEAM, |spec| {
                let mut setup = hardened("setup");
                setup["securityContext"]["allowPrivilegeEscalation"] = json!(true);
                spec["initContainers"] = json!([setup]);
            }),
        ),
        (
            "containers[0].securityContext.capabilities.add adds a capability other than NET_RAW",
            pool_with(TEAM, |spec| {
                spec["containers"][0]["securityContext"]["capabilities"]["add"] = json!(["NET_RAW", "SYS_ADMIN"]);
            }),
        ),
        (
            "initContainers[0].securityContext.capabilities.add adds a capability other than NET_RAW",
            pool_with(TEAM, |spec| {
                let mut setup = hardened("setup");
                setup["securityContext"]["capabilities"]["add"] = json!(["NET_ADMIN"]);
                spec["initContainers"] = json!([setup]);
            }),
        ),
        ("hostNetwork is true", pool_with(TEAM, |spec| spec["hostNetwork"] = json!(true))),
        ("hostPID is true", pool_with(TEAM, |spec| spec["hostPID"] = json!(true))),
        ("hostIPC is true", pool_with(TEAM, |spec| spec["hostIPC"] = json!(true))),
        (
            "volumes[1].hostPath",
            pool_with(TEAM, |spec| {
                spec["volumes"] = json!([
                    { "name": "scratch", "emptyDir": {} },
                    { "name": "root", "hostPath": { "path": "/" } },
                ]);
            }),
        ),
        (
            "containers[0].ports[1].hostPort is set",
            pool_with(TEAM, |spec| spec["containers"][0]["ports"][1]["hostPort"] = json!(8080)),
        ),
        (
            "initContainers[0].ports[0].hostPort is set",
            pool_with(TEAM, |spec| {
                let mut setup = hardened("setup");
                setup["ports"] = json!([{ "containerPort": 9000, "hostPort": 9000 }]);
                spec["initContainers"] = json!([setup]);
            }),
        ),
        // The operator's own account would give the pool's pods its rights.
        (
            "serviceAccountName tidepool-operator is not allowed in namespace tidepool",
            pool_with(RELEASE_NAMESPACE, |spec| spec["serviceAccountName"] = json!("tidepool-operator")),
        ),
        (
            "serviceAccount admin is not allowed in namespace team-a",
            pool_with(TEAM, |spec| spec["serviceAccount"] = json!("admin")),
        ),
        // An account one namespace allows, in a namespace that does not.
        (
            "serviceAccountName probe-runner is not allowed in namespace team-b",
            pool_with(OTHER_TEAM, |spec| spec["serviceAccountName"] = json!("probe-runner")),
        ),
        // The chart's session account is allowed in the release namespace only.
        (
            "serviceAccountName tidepool-session is not allowed in namespace team-a",
            pool_with(TEAM, |spec| spec["serviceAccountName"] = json!("tidepool-session")),
        ),
    ];
    for (words, pool) in &cases {
        let expected = format!("{field}.{words}");
        let (code, message) = answer(&client, pool, false).await.unwrap_or_else(|| panic!("accepted: {expected}"));
        assert_eq!(code, 403, "{expected}: {message}");
        assert!(message.contains("tidepool-warmpool-templates"), "{expected}: {message}");
        assert!(message.contains(&expected), "no {expected:?} in: {message}");
    }

    // Accepted: the chart's own pool in the release namespace, the example
    // pool, and hardened pools with an account their namespace allows, even
    // with NET_RAW for raw ICMP sockets.
    let example: Value =
        serde_yaml::from_str(&std::fs::read_to_string(repo().join("tests/examples/warm-pool.yaml")).unwrap()).unwrap();
    let mut example = serde_json::to_value(example).unwrap();
    example["metadata"]["namespace"] = json!(OTHER_TEAM);
    let goods = [
        chart_pool("edge", RELEASE_NAMESPACE),
        example,
        pool_with(TEAM, |spec| {
            spec["serviceAccountName"] = json!("tracer");
            let security = &mut spec["containers"][0]["securityContext"];
            security["capabilities"]["add"] = json!(["NET_RAW"]);
            security["privileged"] = json!(false);
            spec["hostNetwork"] = json!(false);
            spec["containers"][0]["ports"][0]["hostPort"] = json!(0);
            spec["volumes"] = json!([{ "name": "scratch", "emptyDir": {} }]);
        }),
        pool_with(OTHER_TEAM, |spec| spec["serviceAccountName"] = json!("default")),
    ];
    for pool in &goods {
        if let Some(refusal) = answer(&client, pool, true).await {
            panic!("refused {refusal:?}: {pool}");
        }
    }

    // Updates are checked too: an accepted pool cannot be made privileged.
    let privileged = json!({ "spec": { "template": { "spec": { "hostPID": true } } } });
    let refusal = warm_pools(&client, RELEASE_NAMESPACE)
        .patch("edge", &PatchParams::default(), &Patch::Merge(&privileged))
        .await
        .expect_err("an update to hostPID was accepted");
    assert!(refusal.to_string().contains(&format!("{field}.hostPID is true")), "{refusal}");
}
