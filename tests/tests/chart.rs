//! What we ship: the Helm chart, the Argo CD manifests and the Dockerfile,
//! checked with the real tools and a real API server.
//!
//! - The chart's CRDs are the generated ones, byte for byte.
//! - `helm lint` passes; `helm template` renders with the defaults and with
//!   every optional part on; wrong values fail with the schema's message.
//! - The programs accept the arguments the chart gives them, and the alerts
//!   pass `promtool check rules`.
//! - On the harness: the chart renders into objects the API server takes
//!   (server-side dry run, with the Prometheus Operator's real CRDs) and
//!   installs. Each ServiceAccount has the rights it needs and no others:
//!   the operator's pods, sessions and key Secrets only in the namespaces
//!   the chart names, or everywhere when cluster-wide rights are chosen.
//!   The NetworkPolicies the API server keeps say what they should and
//!   select the pods they are for.
//!   The real operator, run as the chart's ServiceAccount with the chart's
//!   arguments, fills the example pool, binds a session, makes the agent
//!   DaemonSet and takes a real agent's reports. The session binary runs
//!   behind the pool's pods with the environment they get. The real
//!   gateway, as the chart's gateway account with the chart's arguments,
//!   syncs its watches and creates a session through the operator. Each
//!   program's /metrics passes promtool.
//! - The Argo CD manifests pass a server-side dry run against Argo CD's CRDs.
//! - The Dockerfile builds one small non-root image per program.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Pod, Secret, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::ResourceExt;
use kube::api::{Api, ListParams};
use serde_yaml::Value;
use tidepool_crds::{Backend, WarmPool};
use tidepool_tests::control_plane::bin_dir;
use tidepool_tests::{ControlPlane, Options, PodRunner, eventually, external_crds, free_port, workspace_binary};

const RELEASE: &str = "tidepool";
const NAMESPACE: &str = "tidepool";
/// The Kubernetes `helm template` renders for: the harness's.
const KUBE_VERSION: &str = "1.36.3";
/// The example pool's pods.
const POOL_PODS: &str = "tidepool.dev/pool=edge";
/// Every pool's pods.
const ALL_POOL_PODS: &str = "tidepool.dev/pool";

/// Values that turn every optional part of the chart on.
const ALL_ON: &str = r#"
images:
  registry: registry.example.com/tidepool/
  tag: "0.1.0-rc.1"
  pullSecrets: [{ name: regcred }]
operator:
  # Helm reads numbers from values files as floats; a million must not render as 1e+06.
  resultRetentionSeconds: 2592000
  podAnnotations: { team: network }
  nodeSelector: { kubernetes.io/os: linux }
  tolerations: [{ key: dedicated, operator: Exists, effect: NoSchedule }]
  affinity: { nodeAffinity: {} }
agent:
  nodeSelector: { tidepool.dev/agent: "true", gpu: "" }
  runtimeClassName: nvidia
rbac:
  # The namespaces of both releases that render this (tidepool, tidepool-check),
  # which hold their example pools and sessions, and two pool namespaces.
  namespaces: [tidepool, tidepool-check, team-a, team-b]
network:
  clusterCIDRs: [10.244.0.0/16, 10.96.0.0/12, fd00:10:244::/56]
  policies:
    dns: { namespace: dns, podLabels: { app: coredns } }
    blockedCIDRs: [169.254.0.0/16]
admissionPolicy:
  validationActions: [Warn, Audit]
metrics:
  serviceMonitor: { enabled: true, labels: { release: prometheus } }
  podMonitor: { enabled: true }
  prometheusRule: { enabled: true }
examplePool:
  tier: { vcpu: 2, memoryMiB: 1048576 }
  bytesPerHour: 90000000000
gateway:
  enabled: true
  logLevel: debug
  publicUrl: https://sessions.example.com
  trustedProxies: [10.0.0.0/8, fd00::/8]
  anonymous: { allow: [203.0.113.0/24, 2001:db8::/32], sessionsPerHour: 10, concurrentSessions: 1, mibPerHour: 2048 }
  streamsPerSession: 8
  maxConnections: 10000
  tlsSecretName: gateway-tls
  corsOrigins: [https://speed.example.com, http://localhost:5173]
  routed:
    paths: [/app, /browse]
    tiers: { small: { vcpu: 1, memoryMiB: 2048 }, gpu: { vcpu: 4, memoryMiB: 16384, gpus: 1 } }
    defaultTier: small
    backendPort: 8080
  podAnnotations: { team: edge }
  nodeSelector: { kubernetes.io/os: linux }
  tolerations: [{ key: dedicated, operator: Exists, effect: NoSchedule }]
  affinity: { nodeAffinity: {} }
  service: { type: LoadBalancer, port: 8000 }
  autoscaling: { enabled: true, minReplicas: 3, maxReplicas: 20, targetCPUUtilizationPercentage: 60 }
  ingress:
    enabled: true
    className: nginx
    host: sessions.example.com
    tlsSecretName: sessions-tls
    annotations: { nginx.ingress.kubernetes.io/proxy-read-timeout: "3600" }
  # The harness has no Gateway API CRDs: its dry run leaves this out.
  httpRoute:
    enabled: true
    parentRefs: [{ name: public, namespace: gateways, sectionName: https }]
    hostnames: [sessions.example.com]
"#;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn chart() -> PathBuf {
    repo().join("helm/tidepool")
}

/// A file of this test process's own, for values and rendered manifests.
/// The directories of earlier runs whose process is gone are removed.
fn scratch(name: &str, text: &str) -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    let dir = DIR.get_or_init(|| {
        let root = std::env::temp_dir().join("tidepool-chart");
        for entry in std::fs::read_dir(&root).into_iter().flatten().flatten() {
            let pid = entry.file_name().to_string_lossy().into_owned();
            if !Path::new("/proc").join(&pid).exists() {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
        let dir = root.join(std::process::id().to_string());
        std::fs::create_dir_all(&dir).unwrap();
        dir
    });
    let path = dir.join(name);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, text).unwrap();
    path
}

/// Runs `command`: its stdout when it succeeds, else its stdout and stderr.
fn run(command: &mut Command) -> Result<String, String> {
    let output = command.output().unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if output.status.success() {
        Ok(stdout)
    } else {
        Err(format!("{stdout}{}", String::from_utf8_lossy(&output.stderr)))
    }
}

fn helm() -> Command {
    Command::new(bin_dir().unwrap().join("helm"))
}

/// `helm template` of the chart with `extra` arguments (values).
fn template(release: &str, namespace: &str, extra: &[&str]) -> Result<String, String> {
    run(helm()
        .args(["template", release])
        .arg(chart())
        .args(["--namespace", namespace, "--kube-version", KUBE_VERSION])
        .args(extra))
}

/// The objects in a multi-document YAML text.
fn documents(yaml: &str) -> Vec<Value> {
    yaml.split("\n---")
        .map(|doc| serde_yaml::from_str::<Value>(doc).unwrap_or_else(|e| panic!("{e} in:\n{doc}")))
        .filter(|doc| !doc.is_null())
        .collect()
}

/// The default release's objects rendered with `extra` arguments.
fn render(extra: &[&str]) -> Vec<Value> {
    documents(&template(RELEASE, NAMESPACE, extra).unwrap_or_else(|e| panic!("helm template {extra:?}: {e}")))
}

fn str_of(value: &Value) -> &str {
    value.as_str().unwrap_or_default()
}

fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| str_of(&o["kind"]) == kind && str_of(&o["metadata"]["name"]) == name)
        .unwrap_or_else(|| panic!("no {kind} {name} rendered"))
}

/// "Kind namespace/name" of every object, sorted.
fn inventory(objects: &[Value]) -> Vec<String> {
    let mut all: Vec<String> = objects
        .iter()
        .map(|o| {
            let meta = &o["metadata"];
            match meta["namespace"].as_str() {
                Some(ns) => format!("{} {ns}/{}", str_of(&o["kind"]), str_of(&meta["name"])),
                None => format!("{} {}", str_of(&o["kind"]), str_of(&meta["name"])),
            }
        })
        .collect();
    all.sort();
    all
}

fn strings(value: &Value) -> Vec<String> {
    value.as_sequence().map(|s| s.iter().map(|v| str_of(v).to_string()).collect()).unwrap_or_default()
}

/// The operator container's arguments.
fn operator_args(objects: &[Value]) -> Vec<String> {
    let deployment = find(objects, "Deployment", "tidepool-operator");
    strings(&deployment["spec"]["template"]["spec"]["containers"][0]["args"])
}

/// The gateway container's arguments.
fn gateway_args(objects: &[Value]) -> Vec<String> {
    let deployment = find(objects, "Deployment", "tidepool-gateway");
    strings(&deployment["spec"]["template"]["spec"]["containers"][0]["args"])
}

/// A pod spec that runs as non-root on a read-only root, with no privilege,
/// no capability, the runtime's seccomp profile, and bounded resources.
fn assert_hardened(what: &str, pod: &Value) {
    let security = &pod["securityContext"];
    assert_eq!(security["runAsNonRoot"].as_bool(), Some(true), "{what}: runAsNonRoot");
    assert_eq!(str_of(&security["seccompProfile"]["type"]), "RuntimeDefault", "{what}: seccomp");
    let containers = pod["containers"].as_sequence().unwrap();
    for container in containers {
        let security = &container["securityContext"];
        assert_eq!(security["allowPrivilegeEscalation"].as_bool(), Some(false), "{what}: privilege escalation");
        assert_eq!(security["readOnlyRootFilesystem"].as_bool(), Some(true), "{what}: read-only root");
        assert_eq!(strings(&security["capabilities"]["drop"]), ["ALL"], "{what}: capabilities");
        for kind in ["requests", "limits"] {
            for resource in ["cpu", "memory"] {
                assert!(!container["resources"][kind][resource].is_null(), "{what}: no {kind}.{resource}");
            }
        }
    }
}

/// Every grant of a Role or ClusterRole as "verb resource.group", sorted.
fn grants(role: &Value) -> Vec<String> {
    let mut all = Vec::new();
    for rule in role["rules"].as_sequence().unwrap() {
        for group in strings(&rule["apiGroups"]) {
            for resource in strings(&rule["resources"]) {
                for verb in strings(&rule["verbs"]) {
                    let resource = if group.is_empty() { resource.clone() } else { format!("{resource}.{group}") };
                    all.push(format!("{verb} {resource}"));
                }
            }
        }
    }
    all.sort();
    all
}

/// What the operator may do across the cluster whatever it is set to, sorted.
const CLUSTER_SCOPED_GRANTS: &[&str] = &[
    "create backends.tidepool.dev",
    "create subjectaccessreviews.authorization.k8s.io",
    "create tokenreviews.authentication.k8s.io",
    "get backends.tidepool.dev",
    "get nodes",
    "list backends.tidepool.dev",
    "list nodes",
    "patch backends.tidepool.dev",
    "patch backends/status.tidepool.dev",
    "watch backends.tidepool.dev",
    "watch nodes",
];

/// What the operator may do in each namespace it works in, sorted.
const NAMESPACED_GRANTS: &[&str] = &[
    "create events.events.k8s.io",
    "create pods",
    "create secrets",
    "create testsessions.tidepool.dev",
    "create tubes.tidepool.dev",
    "delete pods",
    "delete testsessions.tidepool.dev",
    "delete tubes.tidepool.dev",
    "get monitors.tidepool.dev",
    "get pods",
    "get secrets",
    "get testsessions.tidepool.dev",
    "get tubes.tidepool.dev",
    "get warmpools.tidepool.dev",
    "list monitors.tidepool.dev",
    "list pods",
    "list testsessions.tidepool.dev",
    "list tubes.tidepool.dev",
    "list warmpools.tidepool.dev",
    "patch events.events.k8s.io",
    "patch monitors/status.tidepool.dev",
    "patch pods",
    "patch testsessions/status.tidepool.dev",
    "patch tubes.tidepool.dev",
    "patch tubes/status.tidepool.dev",
    "patch warmpools/status.tidepool.dev",
    "update monitors/finalizers.tidepool.dev",
    "update secrets",
    "update tubes/finalizers.tidepool.dev",
    "update warmpools/finalizers.tidepool.dev",
    "watch monitors.tidepool.dev",
    "watch pods",
    "watch testsessions.tidepool.dev",
    "watch tubes.tidepool.dev",
    "watch warmpools.tidepool.dev",
];

/// What the gateway may do in each namespace it serves, sorted: read pools,
/// sessions and pods, and the session verbs the operator's API reviews.
const GATEWAY_GRANTS: &[&str] = &[
    "create testsessions.tidepool.dev",
    "create testsessions/relay.tidepool.dev",
    "delete testsessions.tidepool.dev",
    "get pods",
    "get testsessions.tidepool.dev",
    "get warmpools.tidepool.dev",
    "list pods",
    "list testsessions.tidepool.dev",
    "list warmpools.tidepool.dev",
    "patch testsessions.tidepool.dev",
    "watch pods",
    "watch testsessions.tidepool.dev",
    "watch warmpools.tidepool.dev",
];

/// The objects the gateway adds to a release with the defaults otherwise.
const GATEWAY_OBJECTS: &[&str] = &[
    "Deployment tidepool/tidepool-gateway",
    "NetworkPolicy tidepool/tidepool-gateway",
    "PodDisruptionBudget tidepool/tidepool-gateway",
    "Role tidepool/tidepool-gateway",
    "RoleBinding tidepool/tidepool-gateway",
    "Service tidepool/tidepool-gateway",
    "ServiceAccount tidepool/tidepool-gateway",
];

/// A NetworkPolicy rule's ports as "port/protocol".
fn ports(list: &Value) -> Vec<String> {
    let list = list.as_sequence().map(Vec::as_slice).unwrap_or_default();
    list.iter()
        .map(|p| {
            let port = p["port"].as_u64().map_or_else(|| str_of(&p["port"]).to_string(), |n| n.to_string());
            format!("{port}/{}", str_of(&p["protocol"]))
        })
        .collect()
}

/// Whether a podSelector of matchLabels and Exists expressions selects a
/// pod with `labels`.
fn selects(selector: &Value, labels: &Value) -> bool {
    let labels = labels.as_mapping().cloned().unwrap_or_default();
    let matched = selector["matchLabels"].as_mapping().into_iter().flatten().all(|(k, v)| labels.get(k) == Some(v));
    let expressions = selector["matchExpressions"].as_sequence().map(Vec::as_slice).unwrap_or_default();
    let exist = expressions.iter().all(|e| {
        assert_eq!(str_of(&e["operator"]), "Exists", "only Exists is read here");
        labels.contains_key(&e["key"])
    });
    matched && exist
}

/// The session pods' policy: every pool pod; in from anywhere on the
/// session port; out only to `dns` (namespace, label, value) on port 53,
/// to the operator on 8080, and to every address but `blocked4`/`blocked6`.
fn assert_session_policy(spec: &Value, dns: (&str, &str, &str), blocked4: &[&str], blocked6: &[&str]) {
    let pool_pod = serde_yaml::from_str::<Value>("{tidepool.dev/pool: edge}").unwrap();
    assert!(selects(&spec["podSelector"], &pool_pod), "the session policy misses pool pods");
    assert!(!selects(&spec["podSelector"], &Value::Null), "the session policy takes every pod");
    assert_eq!(strings(&spec["policyTypes"]), ["Ingress", "Egress"]);
    let ingress = spec["ingress"].as_sequence().unwrap();
    assert_eq!(ingress.len(), 1);
    assert!(ingress[0]["from"].is_null(), "from anywhere");
    assert_eq!(ports(&ingress[0]["ports"]), ["8080/TCP", "8080/UDP", "session/TCP", "session-udp/UDP", "32768/UDP"]);
    // Tubes' datagrams: the pod's ephemeral ports.
    assert_eq!(ingress[0]["ports"][4]["endPort"].as_u64(), Some(60999));
    let egress = spec["egress"].as_sequence().unwrap();
    assert_eq!(egress.len(), 3, "{egress:?}");
    let to_dns = &egress[0]["to"][0];
    assert_eq!(str_of(&to_dns["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]), dns.0);
    assert_eq!(str_of(&to_dns["podSelector"]["matchLabels"][dns.1]), dns.2);
    assert_eq!(ports(&egress[0]["ports"]), ["53/UDP", "53/TCP"]);
    let to_operator = &egress[1]["to"][0];
    assert_eq!(str_of(&to_operator["podSelector"]["matchLabels"]["app.kubernetes.io/component"]), "operator");
    assert_eq!(ports(&egress[1]["ports"]), ["8080/TCP"]);
    let blocks = egress[2]["to"].as_sequence().unwrap();
    assert!(egress[2]["ports"].is_null(), "any port on the internet");
    let block = |cidr: &str| {
        let found = blocks.iter().find(|b| str_of(&b["ipBlock"]["cidr"]) == cidr);
        strings(&found.unwrap_or_else(|| panic!("no ipBlock {cidr}"))["ipBlock"]["except"])
    };
    assert_eq!(block("0.0.0.0/0"), blocked4);
    assert_eq!(block("::/0"), blocked6);
    assert_eq!(blocks.len(), 2);
}

#[test]
fn chart_crds_are_the_generated_ones() {
    let resync = "resync with: rm helm/tidepool/crds/*.yaml && cp crds/yaml/*.yaml helm/tidepool/crds/";
    let names = |dir: &Path| {
        let mut names: Vec<String> =
            std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        names
    };
    let generated = repo().join("crds/yaml");
    let shipped = chart().join("crds");
    assert_eq!(names(&shipped), names(&generated), "the chart's CRD files differ from crds/yaml; {resync}");
    for name in names(&generated) {
        let same = std::fs::read(generated.join(&name)).unwrap() == std::fs::read(shipped.join(&name)).unwrap();
        assert!(same, "helm/tidepool/crds/{name} differs from crds/yaml/{name}; {resync}");
    }
}

#[test]
fn chart_lints_and_renders_with_defaults_and_with_every_option() {
    let all_on = scratch("all-on.yaml", ALL_ON);
    let all_on = all_on.to_str().unwrap();
    for extra in [vec![], vec!["-f", all_on]] {
        let lint = run(helm().args(["lint", "--strict", "--kube-version", KUBE_VERSION]).arg(chart()).args(&extra));
        lint.unwrap_or_else(|e| panic!("helm lint {extra:?}: {e}"));
    }
    // The chart, its images and the workspace share one version.
    let meta: Value = serde_yaml::from_str(&std::fs::read_to_string(chart().join("Chart.yaml")).unwrap()).unwrap();
    assert_eq!(str_of(&meta["version"]), env!("CARGO_PKG_VERSION"));
    assert_eq!(str_of(&meta["appVersion"]), env!("CARGO_PKG_VERSION"));

    let defaults = render(&[]);
    assert_eq!(
        inventory(&defaults),
        [
            "ClusterRole tidepool-operator",
            "ClusterRoleBinding tidepool-operator",
            "Deployment tidepool/tidepool-operator",
            "NetworkPolicy tidepool/tidepool-agent",
            "NetworkPolicy tidepool/tidepool-operator",
            "NetworkPolicy tidepool/tidepool-sessions",
            "PodDisruptionBudget tidepool/tidepool-operator",
            "Role tidepool/tidepool-operator",
            "Role tidepool/tidepool-operator-pools",
            "RoleBinding tidepool/tidepool-operator",
            "RoleBinding tidepool/tidepool-operator-pools",
            "Secret tidepool/tidepool-api-token",
            "Service tidepool/tidepool-operator",
            "ServiceAccount tidepool/tidepool-agent",
            "ServiceAccount tidepool/tidepool-operator",
            "ServiceAccount tidepool/tidepool-session",
            "ValidatingAdmissionPolicy tidepool-warmpool-templates",
            "ValidatingAdmissionPolicyBinding tidepool-warmpool-templates",
            "WarmPool tidepool/edge",
        ]
    );
    // The gateway is off by default: nothing of it, and the operator caps every caller.
    assert!(!operator_args(&defaults).iter().any(|a| a.starts_with("--uncapped-callers")));

    // The operator: two replicas, leader election with the pod's name, probes,
    // the token as a file from the chart's Secret, results to its own Service.
    let deployment = find(&defaults, "Deployment", "tidepool-operator");
    assert_eq!(deployment["spec"]["replicas"].as_u64(), Some(2));
    let pod = &deployment["spec"]["template"]["spec"];
    assert_hardened("operator", pod);
    assert_eq!(str_of(&pod["serviceAccountName"]), "tidepool-operator");
    let container = &pod["containers"][0];
    let args = operator_args(&defaults);
    for arg in [
        "--lease-namespace=tidepool",
        "--lease-name=tidepool-operator",
        "--api-token-file=/var/run/secrets/tidepool/api/token",
        "--results-url=http://tidepool-operator.tidepool.svc:8080",
        "--agent-operator-url=http://tidepool-operator.tidepool.svc:8080",
        "--agent-service-account=tidepool-agent",
        "--agent-daemonset=tidepool-agent",
        "--agent-image=tidepool-agent:0.1.0",
        "--session-namespace=tidepool",
        // Only in the release namespace, where its Roles are.
        "--namespaces=tidepool",
        "--cluster-cidrs=10.0.0.0/8,172.16.0.0/12,192.168.0.0/16,100.64.0.0/10,fc00::/7",
    ] {
        assert!(args.iter().any(|a| a == arg), "no {arg} in {args:?}");
    }

    // Least privilege by default: the ClusterRole holds only what is
    // cluster-scoped; pods, key Secrets, pools and sessions are the Role's,
    // in the release namespace.
    let cluster_wide = grants(find(&defaults, "ClusterRole", "tidepool-operator"));
    assert_eq!(cluster_wide, CLUSTER_SCOPED_GRANTS, "the ClusterRole's rules");
    let pools = grants(find(&defaults, "Role", "tidepool-operator-pools"));
    assert_eq!(pools, NAMESPACED_GRANTS, "the pools Role's rules");
    let binding = find(&defaults, "RoleBinding", "tidepool-operator-pools");
    assert_eq!(str_of(&binding["roleRef"]["kind"]), "Role");
    assert_eq!(str_of(&binding["subjects"][0]["name"]), "tidepool-operator");
    assert_eq!(str_of(&binding["subjects"][0]["namespace"]), NAMESPACE);

    // Cluster-wide rights are a choice: the same rules in the ClusterRole,
    // no Roles per namespace, and no --namespaces.
    let wide = render(&["--set", "rbac.clusterWide=true"]);
    let wide_grants = grants(find(&wide, "ClusterRole", "tidepool-operator"));
    let mut expected: Vec<String> =
        CLUSTER_SCOPED_GRANTS.iter().chain(NAMESPACED_GRANTS).map(|g| g.to_string()).collect();
    expected.sort();
    assert_eq!(wide_grants, expected, "the cluster-wide ClusterRole's rules");
    assert!(!inventory(&wide).iter().any(|o| o.ends_with("-pools")), "{:?}", inventory(&wide));
    assert!(!operator_args(&wide).iter().any(|a| a.starts_with("--namespaces")), "{:?}", operator_args(&wide));

    // The network policies: the operator and the agents take connections
    // on their port only; session pods take them on the session port and
    // send only to DNS, the operator and the internet outside the
    // cluster's ranges and link-local (metadata) addresses.
    let operator_policy = &find(&defaults, "NetworkPolicy", "tidepool-operator")["spec"];
    assert_eq!(strings(&operator_policy["policyTypes"]), ["Ingress"]);
    assert_eq!(ports(&operator_policy["ingress"][0]["ports"]), ["8080/TCP"]);
    assert!(operator_policy["ingress"][0]["from"].is_null(), "from anywhere");
    let operator_pods = &deployment["spec"]["template"]["metadata"]["labels"];
    assert!(selects(&operator_policy["podSelector"], operator_pods), "the operator's policy misses its pods");
    let agent_policy = &find(&defaults, "NetworkPolicy", "tidepool-agent")["spec"];
    assert_eq!(ports(&agent_policy["ingress"][0]["ports"]), ["9101/TCP"]);
    let sessions = &find(&defaults, "NetworkPolicy", "tidepool-sessions")["spec"];
    assert_session_policy(
        sessions,
        ("kube-system", "k8s-app", "kube-dns"),
        &["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "169.254.0.0/16", "168.63.129.16/32"],
        &["fc00::/7", "fe80::/10", "fd00:ec2::254/128"],
    );
    let env = container["env"].as_sequence().unwrap();
    let pod_name = env.iter().find(|e| str_of(&e["name"]) == "POD_NAME").expect("POD_NAME for --identity");
    assert_eq!(str_of(&pod_name["valueFrom"]["fieldRef"]["fieldPath"]), "metadata.name");
    assert_eq!(str_of(&container["livenessProbe"]["httpGet"]["path"]), "/healthz");
    assert_eq!(str_of(&container["readinessProbe"]["httpGet"]["path"]), "/readyz");
    assert_eq!(str_of(&pod["volumes"][0]["secret"]["secretName"]), "tidepool-api-token");
    assert_eq!(str_of(&container["volumeMounts"][0]["mountPath"]), "/var/run/secrets/tidepool/api");
    let token = find(&defaults, "Secret", "tidepool-api-token");
    assert_eq!(str_of(&token["data"]["token"]).len(), 64, "48 random characters, base64");

    // The agents and the session pods get no API token at all.
    for account in ["tidepool-agent", "tidepool-session"] {
        let account = find(&defaults, "ServiceAccount", account);
        assert_eq!(account["automountServiceAccountToken"].as_bool(), Some(false));
    }

    // The example pool's pods: the session image, hardened, TCP and UDP on
    // 8080, probes on /health, and the showcase's resources.
    let pool = find(&defaults, "WarmPool", "edge");
    let pod = &pool["spec"]["template"]["spec"];
    assert_hardened("session", pod);
    assert_eq!(str_of(&pod["serviceAccountName"]), "tidepool-session");
    assert_eq!(pod["automountServiceAccountToken"].as_bool(), Some(false));
    let session = &pod["containers"][0];
    assert_eq!(str_of(&session["image"]), "tidepool-session:0.1.0");
    let ports: Vec<(u64, &str)> = session["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|p| (p["containerPort"].as_u64().unwrap(), str_of(&p["protocol"])))
        .collect();
    assert_eq!(ports, [(8080, "TCP"), (8080, "UDP")]);
    for probe in ["readinessProbe", "livenessProbe"] {
        assert_eq!(str_of(&session[probe]["httpGet"]["path"]), "/health");
    }
    let resources = &session["resources"];
    let quantity = |kind: &str, resource: &str| str_of(&resources[kind][resource]).to_string();
    assert_eq!(
        [
            quantity("requests", "cpu"),
            quantity("limits", "cpu"),
            quantity("requests", "memory"),
            quantity("limits", "memory")
        ],
        ["10m", "100m", "32Mi", "256Mi"]
    );

    // Every option on: the monitors, the rule, Roles and session policies
    // in each listed namespace, the cluster's own ranges and DNS, the
    // admission policy on trial, the agents' node selector and
    // RuntimeClass, images from the registry.
    let all = render(&["-f", all_on]);
    let listed = inventory(&all);
    for object in [
        "ServiceMonitor tidepool/tidepool-operator",
        "PodMonitor tidepool/tidepool-agent",
        "PrometheusRule tidepool/tidepool-operator",
        "Role team-a/tidepool-operator-pools",
        "RoleBinding team-b/tidepool-operator-pools",
        "NetworkPolicy team-a/tidepool-sessions",
        "NetworkPolicy team-b/tidepool-sessions",
    ] {
        assert!(listed.iter().any(|o| o == object), "no {object} in {listed:?}");
    }
    assert_eq!(grants(find(&all, "ClusterRole", "tidepool-operator")), CLUSTER_SCOPED_GRANTS);
    let sessions = all
        .iter()
        .find(|o| str_of(&o["kind"]) == "NetworkPolicy" && str_of(&o["metadata"]["namespace"]) == "team-b")
        .unwrap();
    assert_session_policy(
        &sessions["spec"],
        ("dns", "app", "coredns"),
        &["10.244.0.0/16", "10.96.0.0/12", "169.254.0.0/16"],
        &["fd00:10:244::/56"],
    );
    let binding = find(&all, "ValidatingAdmissionPolicyBinding", "tidepool-warmpool-templates");
    assert_eq!(strings(&binding["spec"]["validationActions"]), ["Warn", "Audit"]);
    let args = operator_args(&all);
    for arg in [
        "--namespaces=tidepool,tidepool-check,team-a,team-b",
        "--cluster-cidrs=10.244.0.0/16,10.96.0.0/12,fd00:10:244::/56",
        "--agent-node-selector=tidepool.dev/agent=true",
        "--agent-node-selector=gpu=",
        "--agent-runtime-class=nvidia",
        "--agent-image=registry.example.com/tidepool/tidepool-agent:0.1.0-rc.1",
        "--result-retention-seconds=2592000",
    ] {
        assert!(args.iter().any(|a| a == arg), "no {arg} in {args:?}");
    }
    let tier = &find(&all, "WarmPool", "edge")["spec"]["tier"];
    assert_eq!((tier["vcpu"].as_u64(), tier["memoryMiB"].as_u64()), (Some(2), Some(1048576)));
    for account in ["tidepool-operator", "tidepool-agent", "tidepool-session"] {
        let account = find(&all, "ServiceAccount", account);
        assert_eq!(str_of(&account["imagePullSecrets"][0]["name"]), "regcred");
    }

    // The agents off: the operator leaves the DaemonSet alone and may not touch it.
    let off = render(&["--set", "agent.enabled=false"]);
    let args = operator_args(&off);
    assert!(args.iter().any(|a| a == "--no-agent-daemonset"));
    assert!(!args.iter().any(|a| a.starts_with("--agent-image")));
    assert!(!serde_yaml::to_string(find(&off, "Role", "tidepool-operator")).unwrap().contains("daemonsets"));

    // Policies off: no NetworkPolicy, no admission policy; the operator
    // still keeps session pods from the cluster's ranges.
    let off = render(&["--set", "network.policies.enabled=false,admissionPolicy.enabled=false"]);
    let kinds: Vec<&str> = off.iter().map(|o| str_of(&o["kind"])).collect();
    assert!(!kinds.iter().any(|k| k.starts_with("NetworkPolicy") || k.starts_with("ValidatingAdmission")), "{kinds:?}");
    assert!(operator_args(&off).iter().any(|a| a.starts_with("--cluster-cidrs=10.0.0.0/8,")));

    // A Secret of the user's own: the chart makes none and mounts that one.
    let own = render(&["--set", "apiToken.existingSecret=my-token"]);
    assert!(!inventory(&own).iter().any(|o| o.starts_with("Secret ")));
    let pod = &find(&own, "Deployment", "tidepool-operator")["spec"]["template"]["spec"];
    assert_eq!(str_of(&pod["volumes"][0]["secret"]["secretName"]), "my-token");

    // Geography: the regions' coordinates as flags, the GeoIP database from
    // the volume given, mounted read-only.
    let placed = render(&[
        "--set-json",
        r#"fleet.regionCoordinates={"eu-west":{"latitude":50.11,"longitude":8.68}}"#,
        "--set-json",
        r#"fleet.geoip={"volume":{"persistentVolumeClaim":{"claimName":"geoip"}},"file":"GeoLite2-City.mmdb"}"#,
    ]);
    let args = operator_args(&placed);
    for arg in
        ["--region-coordinates=eu-west=50.11,8.68", "--geoip-database=/var/lib/tidepool/geoip/GeoLite2-City.mmdb"]
    {
        assert!(args.iter().any(|a| a == arg), "no {arg} in {args:?}");
    }
    let pod = &find(&placed, "Deployment", "tidepool-operator")["spec"]["template"]["spec"];
    let volume = pod["volumes"].as_sequence().unwrap().iter().find(|v| str_of(&v["name"]) == "geoip").unwrap();
    assert_eq!(str_of(&volume["persistentVolumeClaim"]["claimName"]), "geoip");
    let mount = &pod["containers"][0]["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|m| str_of(&m["name"]) == "geoip")
        .cloned()
        .unwrap();
    assert_eq!((str_of(&mount["mountPath"]), mount["readOnly"].as_bool()), ("/var/lib/tidepool/geoip", Some(true)));
    let without_file = template(RELEASE, NAMESPACE, &["--set-json", r#"fleet.geoip={"volume":{"emptyDir":{}}}"#]);
    assert!(without_file.expect_err("a database with no file").contains("fleet.geoip.file"));

    // The results store: its flags, and its keys from the Secret named, never in the args.
    assert!(!operator_args(&render(&[])).iter().any(|a| a.starts_with("--results-store")));
    let stored = render(&["--set-json", RESULTS_STORE]);
    let args = operator_args(&stored);
    for arg in [
        "--results-store-endpoint=https://s3.eu-west-1.amazonaws.com",
        "--results-store-bucket=tidepool-results",
        "--results-store-prefix=tidepool/",
        "--results-store-region=eu-west-1",
        "--results-store-virtual-hosted",
    ] {
        assert!(args.iter().any(|a| a == arg), "no {arg} in {args:?}");
    }
    let env = &find(&stored, "Deployment", "tidepool-operator")["spec"]["template"]["spec"]["containers"][0]["env"];
    for (name, key) in [("AWS_ACCESS_KEY_ID", "accessKeyId"), ("AWS_SECRET_ACCESS_KEY", "secretAccessKey")] {
        let var = env.as_sequence().unwrap().iter().find(|e| str_of(&e["name"]) == name).unwrap();
        let from = &var["valueFrom"]["secretKeyRef"];
        assert_eq!((str_of(&from["name"]), str_of(&from["key"])), ("s3-keys", key));
    }
    let keyless =
        template(RELEASE, NAMESPACE, &["--set", "resultsStore.endpoint=http://s3:8333,resultsStore.bucket=results"]);
    assert!(keyless.expect_err("a store with no keys").contains("resultsStore.credentialsSecret"));

    gateway_renders(&defaults, &all);
}

/// The gateway's objects: with the defaults otherwise, and with every option.
fn gateway_renders(defaults: &[Value], all: &[Value]) {
    // On with the defaults: exactly its own objects besides the rest.
    let on = render(&["--set", "gateway.enabled=true"]);
    let mut expected: Vec<String> =
        inventory(defaults).into_iter().chain(GATEWAY_OBJECTS.iter().map(|o| o.to_string())).collect();
    expected.sort();
    assert_eq!(inventory(&on), expected);
    // The operator leaves the gateway's account out of its per-caller cap.
    assert!(
        operator_args(&on).iter().any(|a| a == "--uncapped-callers=system:serviceaccount:tidepool:tidepool-gateway")
    );

    let deployment = find(&on, "Deployment", "tidepool-gateway");
    assert_eq!(deployment["spec"]["replicas"].as_u64(), Some(2));
    let pod = &deployment["spec"]["template"]["spec"];
    assert_hardened("gateway", pod);
    assert_eq!(str_of(&pod["serviceAccountName"]), "tidepool-gateway");
    // Its token reads the watches and is shown to the operator's API, from the default path.
    assert_eq!(pod["automountServiceAccountToken"].as_bool(), Some(true));
    let container = &pod["containers"][0];
    assert_eq!(str_of(&container["image"]), "tidepool-gateway:0.1.0");
    assert_eq!(
        gateway_args(&on),
        [
            "--listen=0.0.0.0:8080",
            "--admin-listen=0.0.0.0:9090",
            "--udp-listen=0.0.0.0:8080",
            "--udp-advertised-port=80",
            "--operator-url=http://tidepool-operator.tidepool.svc:8080",
            "--namespaces=tidepool",
            "--session-namespace=tidepool",
            "--anonymous-sessions-per-hour=30",
            "--anonymous-concurrent-sessions=2",
            "--anonymous-mib-per-hour=51200",
            "--streams-per-session=16",
            "--max-connections=4096",
            "--ui-dir=/usr/share/tidepool/ui",
        ]
    );
    let named_ports: Vec<(String, u64)> = container["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|p| (str_of(&p["name"]).to_string(), p["containerPort"].as_u64().unwrap()))
        .collect();
    assert_eq!(named_ports, [("http".to_string(), 8080), ("udp".to_string(), 8080), ("admin".to_string(), 9090)]);
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        assert_eq!(str_of(&container[probe]["httpGet"]["path"]), path, "{probe}");
        assert_eq!(str_of(&container[probe]["httpGet"]["port"]), "admin", "{probe}");
    }
    let gateway_pods = &deployment["spec"]["template"]["metadata"]["labels"];
    assert!(selects(&deployment["spec"]["selector"], gateway_pods));
    let operator_pods = &find(&on, "Deployment", "tidepool-operator")["spec"]["template"]["metadata"]["labels"];
    assert!(
        !selects(&deployment["spec"]["selector"], operator_pods),
        "the gateway's selector takes the operator's pods"
    );

    // Its own account, with only reading and the session verbs, in the namespaces it serves.
    assert!(find(&on, "ServiceAccount", "tidepool-gateway")["automountServiceAccountToken"].is_null());
    assert_eq!(grants(find(&on, "Role", "tidepool-gateway")), GATEWAY_GRANTS, "the gateway Role's rules");
    let binding = find(&on, "RoleBinding", "tidepool-gateway");
    assert_eq!(
        (str_of(&binding["roleRef"]["kind"]), str_of(&binding["roleRef"]["name"])),
        ("Role", "tidepool-gateway")
    );
    assert_eq!(str_of(&binding["subjects"][0]["name"]), "tidepool-gateway");
    assert_eq!(str_of(&binding["subjects"][0]["namespace"]), NAMESPACE);

    // The Service: users on port 80, Prometheus on the admin port.
    let service = find(&on, "Service", "tidepool-gateway");
    let service_ports: Vec<(String, u64, String)> = service["spec"]["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|p| (str_of(&p["name"]).to_string(), p["port"].as_u64().unwrap(), str_of(&p["targetPort"]).to_string()))
        .collect();
    assert_eq!(
        service_ports,
        [("http".into(), 80, "http".into()), ("udp".into(), 80, "udp".into()), ("admin".into(), 9090, "admin".into())]
    );
    // The UDP echo's routes live in the replica that passed on the grant.
    assert_eq!(str_of(&service["spec"]["sessionAffinity"]), "ClientIP");
    let without_udp = render(&["--set", "gateway.enabled=true,gateway.udp.enabled=false"]);
    assert!(gateway_args(&without_udp).iter().any(|a| a == "--udp-listen=off"));
    let service = find(&without_udp, "Service", "tidepool-gateway");
    assert!(service["spec"]["sessionAffinity"].is_null());
    assert_eq!(service["spec"]["ports"].as_sequence().unwrap().len(), 2, "no UDP port");
    let policy = &find(&without_udp, "NetworkPolicy", "tidepool-gateway")["spec"];
    assert_eq!(ports(&policy["ingress"][0]["ports"]), ["8080/TCP", "9090/TCP"]);
    let mut selector = serde_yaml::Mapping::new();
    selector.insert("matchLabels".into(), service["spec"]["selector"].clone());
    assert!(selects(&Value::Mapping(selector), gateway_pods), "the Service misses the gateway's pods");
    let budget = &find(&on, "PodDisruptionBudget", "tidepool-gateway")["spec"];
    assert_eq!(budget["maxUnavailable"].as_u64(), Some(1));
    assert!(selects(&budget["selector"], gateway_pods));

    // Its pods take connections on their two ports only. The operator's API
    // and the session port already let anyone in, the gateway too.
    let policy = &find(&on, "NetworkPolicy", "tidepool-gateway")["spec"];
    assert_eq!(strings(&policy["policyTypes"]), ["Ingress"]);
    assert_eq!(ports(&policy["ingress"][0]["ports"]), ["8080/TCP", "8080/UDP", "9090/TCP"]);
    assert!(selects(&policy["podSelector"], gateway_pods), "the gateway's policy misses its pods");
    for name in ["tidepool-operator", "tidepool-sessions"] {
        let ingress = &find(&on, "NetworkPolicy", name)["spec"]["ingress"];
        assert!(
            ingress.as_sequence().unwrap().iter().all(|rule| rule["from"].is_null()),
            "{name} keeps the gateway out"
        );
    }

    // One replica: no budget, which would block every drain.
    let one = render(&["--set", "gateway.enabled=true,gateway.replicas=1"]);
    assert!(!inventory(&one).iter().any(|o| o.starts_with("PodDisruptionBudget tidepool/tidepool-gateway")));

    // Every option on: its flags, the autoscaler instead of a replica
    // count, a Role in each of the operator's namespaces, the Ingress, the
    // HTTPRoute and the ServiceMonitor on the admin port.
    let listed = inventory(all);
    for object in [
        "HorizontalPodAutoscaler tidepool/tidepool-gateway",
        "Ingress tidepool/tidepool-gateway",
        "HTTPRoute tidepool/tidepool-gateway",
        "ServiceMonitor tidepool/tidepool-gateway",
        "Role team-a/tidepool-gateway",
        "RoleBinding team-b/tidepool-gateway",
        "PodDisruptionBudget tidepool/tidepool-gateway",
    ] {
        assert!(listed.iter().any(|o| o == object), "no {object} in {listed:?}");
    }
    // Routed paths add one cluster-wide right: reading Backends, which the
    // operator's router reviews before it answers.
    let router_role = find(all, "ClusterRole", "tidepool-gateway-router");
    assert_eq!(grants(router_role), ["get backends.tidepool.dev"]);
    let router_binding = find(all, "ClusterRoleBinding", "tidepool-gateway-router");
    assert_eq!(str_of(&router_binding["roleRef"]["name"]), "tidepool-gateway-router");
    assert_eq!(str_of(&router_binding["subjects"][0]["name"]), "tidepool-gateway");
    assert_eq!(grants(find(all, "Role", "tidepool-gateway")), GATEWAY_GRANTS);
    assert_eq!(
        gateway_args(all),
        [
            "--listen=0.0.0.0:8080",
            "--admin-listen=0.0.0.0:9090",
            "--udp-listen=0.0.0.0:8080",
            "--udp-advertised-port=8000",
            "--operator-url=http://tidepool-operator.tidepool.svc:8080",
            "--namespaces=tidepool,tidepool-check,team-a,team-b",
            "--session-namespace=tidepool",
            "--public-url=https://sessions.example.com",
            "--trusted-proxies=10.0.0.0/8,fd00::/8",
            "--anonymous-allow=203.0.113.0/24,2001:db8::/32",
            "--anonymous-sessions-per-hour=10",
            "--anonymous-concurrent-sessions=1",
            "--anonymous-mib-per-hour=2048",
            "--streams-per-session=8",
            "--max-connections=10000",
            "--tls-cert-file=/etc/tidepool/tls/tls.crt",
            "--tls-key-file=/etc/tidepool/tls/tls.key",
            "--cors-origins=https://speed.example.com,http://localhost:5173",
            "--ui-dir=/usr/share/tidepool/ui",
            "--routed-paths=/app,/browse",
            r#"--routed-tiers={"gpu":{"gpus":1,"memoryMiB":16384,"vcpu":4},"small":{"memoryMiB":2048,"vcpu":1}}"#,
            "--routed-default-tier=small",
            "--routed-backend-port=8080",
        ]
    );
    let deployment = find(all, "Deployment", "tidepool-gateway");
    assert!(deployment["spec"]["replicas"].is_null(), "the autoscaler sets the replicas");
    let pod = &deployment["spec"]["template"]["spec"];
    assert_hardened("gateway", pod);
    assert_eq!(str_of(&pod["containers"][0]["image"]), "registry.example.com/tidepool/tidepool-gateway:0.1.0-rc.1");
    // The TLS Secret is mounted whole (no subPath), so renewals reach the files.
    assert_eq!(str_of(&pod["volumes"][0]["secret"]["secretName"]), "gateway-tls");
    let mount = &pod["containers"][0]["volumeMounts"][0];
    assert_eq!((str_of(&mount["mountPath"]), mount["subPath"].is_null()), ("/etc/tidepool/tls", true));
    assert_eq!(str_of(&pod["nodeSelector"]["kubernetes.io/os"]), "linux");
    assert_eq!(str_of(&pod["tolerations"][0]["key"]), "dedicated");
    let env = pod["containers"][0]["env"].as_sequence().unwrap();
    let log = env.iter().find(|e| str_of(&e["name"]) == "RUST_LOG").unwrap();
    assert_eq!(str_of(&log["value"]), "debug,kube=warn");
    // Each replica writes the bytes it proxies under its own pod's name.
    let replica = env.iter().find(|e| str_of(&e["name"]) == "TIDEPOOL_GATEWAY_REPLICA").unwrap();
    assert_eq!(str_of(&replica["valueFrom"]["fieldRef"]["fieldPath"]), "metadata.name");
    let annotations = &deployment["spec"]["template"]["metadata"]["annotations"];
    assert_eq!((str_of(&annotations["team"]), str_of(&annotations["prometheus.io/port"])), ("edge", "9090"));
    assert_eq!(str_of(&find(all, "ServiceAccount", "tidepool-gateway")["imagePullSecrets"][0]["name"]), "regcred");
    let service = &find(all, "Service", "tidepool-gateway")["spec"];
    assert_eq!((str_of(&service["type"]), service["ports"][0]["port"].as_u64()), ("LoadBalancer", Some(8000)));

    let autoscaler = &find(all, "HorizontalPodAutoscaler", "tidepool-gateway")["spec"];
    assert_eq!(str_of(&autoscaler["scaleTargetRef"]["name"]), "tidepool-gateway");
    assert_eq!(str_of(&autoscaler["scaleTargetRef"]["kind"]), "Deployment");
    assert_eq!((autoscaler["minReplicas"].as_u64(), autoscaler["maxReplicas"].as_u64()), (Some(3), Some(20)));
    let cpu = &autoscaler["metrics"][0]["resource"];
    assert_eq!((str_of(&cpu["name"]), cpu["target"]["averageUtilization"].as_u64()), ("cpu", Some(60)));

    let ingress = find(all, "Ingress", "tidepool-gateway");
    assert_eq!(str_of(&ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-read-timeout"]), "3600");
    let spec = &ingress["spec"];
    assert_eq!(str_of(&spec["ingressClassName"]), "nginx");
    assert_eq!(str_of(&spec["tls"][0]["secretName"]), "sessions-tls");
    assert_eq!(strings(&spec["tls"][0]["hosts"]), ["sessions.example.com"]);
    assert_eq!(str_of(&spec["rules"][0]["host"]), "sessions.example.com");
    let path = &spec["rules"][0]["http"]["paths"][0];
    assert_eq!((str_of(&path["path"]), str_of(&path["pathType"])), ("/", "Prefix"));
    let backend = &path["backend"]["service"];
    assert_eq!((str_of(&backend["name"]), str_of(&backend["port"]["name"])), ("tidepool-gateway", "http"));

    let route = &find(all, "HTTPRoute", "tidepool-gateway")["spec"];
    let parent = &route["parentRefs"][0];
    assert_eq!(
        (str_of(&parent["name"]), str_of(&parent["namespace"]), str_of(&parent["sectionName"])),
        ("public", "gateways", "https")
    );
    assert_eq!(strings(&route["hostnames"]), ["sessions.example.com"]);
    let backend = &route["rules"][0]["backendRefs"][0];
    assert_eq!((str_of(&backend["name"]), backend["port"].as_u64()), ("tidepool-gateway", Some(8000)));

    let monitor = &find(all, "ServiceMonitor", "tidepool-gateway");
    assert_eq!(str_of(&monitor["metadata"]["labels"]["release"]), "prometheus");
    assert_eq!(str_of(&monitor["spec"]["endpoints"][0]["port"]), "admin");
    let gateway_service = find(all, "Service", "tidepool-gateway");
    assert!(
        selects(&monitor["spec"]["selector"], &gateway_service["metadata"]["labels"]),
        "the monitor misses the Service"
    );
    let operator_service = find(all, "Service", "tidepool-operator");
    assert!(!selects(&monitor["spec"]["selector"], &operator_service["metadata"]["labels"]));

    // Fewer namespaces than the operator's, each with its Role.
    let fewer = render(&[
        "--set",
        "gateway.enabled=true,rbac.namespaces={tidepool,team-a,team-b},gateway.namespaces={tidepool,team-a}",
    ]);
    assert!(gateway_args(&fewer).iter().any(|a| a == "--namespaces=tidepool,team-a"));
    let roles: Vec<String> =
        inventory(&fewer).into_iter().filter(|o| o.starts_with("Role ") && o.ends_with("/tidepool-gateway")).collect();
    assert_eq!(roles, ["Role team-a/tidepool-gateway", "Role tidepool/tidepool-gateway"]);
    // A cluster-wide operator: the gateway still names its namespaces (the
    // session namespace by default), with a Role in each and no ClusterRole.
    let wide = render(&["--set", "gateway.enabled=true,rbac.clusterWide=true,operator.sessionNamespace=team-a"]);
    assert!(gateway_args(&wide).iter().any(|a| a == "--namespaces=team-a"));
    assert!(gateway_args(&wide).iter().any(|a| a == "--session-namespace=team-a"));
    assert_eq!(grants(find(&wide, "Role", "tidepool-gateway")), GATEWAY_GRANTS);
    assert_eq!(str_of(&find(&wide, "Role", "tidepool-gateway")["metadata"]["namespace"]), "team-a");
}

/// A results store with every option set.
const RESULTS_STORE: &str = r#"resultsStore={"endpoint":"https://s3.eu-west-1.amazonaws.com","bucket":"tidepool-results","prefix":"tidepool/","region":"eu-west-1","virtualHosted":true,"credentialsSecret":"s3-keys"}"#;

#[test]
fn chart_refuses_wrong_values_with_the_schemas_message() {
    let cases: &[(&str, &[&str])] = &[
        ("operator.replicas=two", &["/operator/replicas", "got string, want integer"]),
        ("operator.replicas=0", &["/operator/replicas", "minimum"]),
        ("operator.logLevel=loud", &["/operator/logLevel", "must be one of", "'info'"]),
        ("operator.replcas=3", &["/operator", "additional properties 'replcas' not allowed"]),
        ("agent.reportIntervalMs=-5", &["/agent/reportIntervalMs", "minimum: got -5, want 50"]),
        ("agent.windows=10x", &["/agent/windows", "does not match pattern"]),
        ("agent.enabled=maybe", &["/agent/enabled", "want boolean"]),
        ("resultsStore.endpoint=s3.example.com", &["/resultsStore/endpoint", "does not match pattern"]),
        ("resultsStore.bucket=My_Bucket", &["/resultsStore/bucket", "does not match pattern"]),
        ("service.port=70000", &["/service/port", "maximum"]),
        ("images.pullPolicy=Sometimes", &["/images/pullPolicy", "must be one of"]),
        ("examplePool.tier.vcpu=0", &["/examplePool/tier/vcpu", "minimum"]),
        ("metrics.serviceMonitor.interval=often", &["/metrics/serviceMonitor/interval", "does not match pattern"]),
        ("rbac.namespaces={Team_A}", &["/rbac/namespaces/0", "does not match pattern"]),
        ("rbac.clusterWide=yes", &["/rbac/clusterWide", "want boolean"]),
        ("rbac.poolNamespaces={team-a}", &["rbac.poolNamespaces is replaced by rbac.namespaces"]),
        (
            "rbac.clusterWide=true,rbac.namespaces={team-a}",
            &["rbac.clusterWide and rbac.namespaces exclude each other"],
        ),
        ("rbac.namespaces={team-a}", &["operator.sessionNamespace (tidepool) must be one of rbac.namespaces [team-a]"]),
        (
            "rbac.namespaces={team-a},operator.sessionNamespace=team-a",
            &["examplePool is in the release namespace tidepool, which rbac.namespaces [team-a] does not list"],
        ),
        ("network.clusterCIDRs={10.0.0.0/33}", &["/network/clusterCIDRs/0", "does not match pattern"]),
        ("network.policies.enabled=yes", &["/network/policies/enabled", "want boolean"]),
        ("network.policies.dns.podLabels=null", &["/network/policies/dns", "missing property 'podLabels'"]),
        ("admissionPolicy.validationActions={Refuse}", &["/admissionPolicy/validationActions/0", "must be one of"]),
        ("admissionPolicy.validationActions={Deny,Warn}", &["Deny and Warn may not be used together"]),
        ("fleet.healthProbeTimeoutSeconds=20", &["healthProbeTimeoutSeconds must be shorter than"]),
        ("examplePool.maxSize=1", &["examplePool.maxSize must be at least examplePool.size"]),
        ("gateway.replicas=two", &["/gateway/replicas", "got string, want integer"]),
        ("gateway.corsOrigins={*}", &["/gateway/corsOrigins/0", "does not match pattern"]),
        ("gateway.routed.paths={app}", &["/gateway/routed/paths/0", "does not match pattern"]),
        ("gateway.trustedProxies={10.0.0.0/33}", &["/gateway/trustedProxies/0", "does not match pattern"]),
        ("gateway.anonymous.allow={anywhere}", &["/gateway/anonymous/allow/0", "does not match pattern"]),
        ("gateway.publicUrl=sessions.example.com", &["/gateway/publicUrl", "does not match pattern"]),
        (
            "gateway.autoscaling.targetCPUUtilizationPercentage=0",
            &["/gateway/autoscaling/targetCPUUtilizationPercentage", "minimum"],
        ),
        ("gateway.ingress.tls=true", &["/gateway/ingress", "additional properties 'tls' not allowed"]),
        (
            "gateway.enabled=true,gateway.namespaces={team-c}",
            &["gateway.namespaces lists team-c, which is not one of the operator's namespaces [tidepool]"],
        ),
        (
            "gateway.enabled=true,rbac.namespaces={tidepool,team-a},gateway.namespaces={team-a}",
            &[
                "the gateway's session namespace tidepool (operator.sessionNamespace) must be one of gateway.namespaces [team-a]",
            ],
        ),
        (
            "gateway.enabled=true,gateway.httpRoute.enabled=true",
            &["gateway.httpRoute.parentRefs must name the Gateway"],
        ),
        (
            "gateway.enabled=true,gateway.autoscaling.enabled=true,gateway.autoscaling.minReplicas=5,gateway.autoscaling.maxReplicas=3",
            &["gateway.autoscaling.minReplicas must be at most gateway.autoscaling.maxReplicas"],
        ),
    ];
    for (value, words) in cases {
        let error = template(RELEASE, NAMESPACE, &["--set", value]).expect_err(value);
        for word in *words {
            assert!(error.contains(word), "--set {value}: no {word:?} in:\n{error}");
        }
    }
    // Network policies without the cluster's ranges would let session pods reach it all.
    let error =
        template(RELEASE, NAMESPACE, &["--set-json", "network.clusterCIDRs=[]"]).expect_err("no cluster ranges");
    assert!(error.contains("network.policies needs network.clusterCIDRs"), "{error}");
}

#[test]
fn chart_alerts_pass_promtool() {
    let rule = render(&["--set", "metrics.prometheusRule.enabled=true"]);
    let rule = find(&rule, "PrometheusRule", "tidepool-operator");
    let groups = scratch("rules.yaml", &serde_yaml::to_string(&rule["spec"]).unwrap());
    run(Command::new(promtool()).args(["check", "rules"]).arg(&groups)).unwrap();
}

/// Debian's prometheus package has it.
fn promtool() -> PathBuf {
    let path = PathBuf::from("/usr/bin/promtool");
    assert!(path.exists(), "promtool is missing: apt-get install -y prometheus");
    path
}

/// Whether `program` takes `args`: clap refuses an unknown flag or a bad
/// value before it reaches the `--help` at the end.
fn accepts(program: &Path, args: &[String]) -> Result<String, String> {
    run(Command::new(program).args(args).arg("--help"))
}

/// Whether the gateway takes `args` all the way: past clap and past its own
/// checks (the CIDRs, the names, the session namespace among the served
/// ones), to where it looks for the Kubernetes API, which it cannot find
/// here: a kubeconfig that does not parse, and no in-cluster environment.
fn gateway_settles(gateway: &Path, args: &[String]) -> Result<(), String> {
    let kubeconfig = scratch("no-kubeconfig", "not: [a kubeconfig");
    let output = Command::new(gateway)
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .env("NO_COLOR", "1")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("KUBERNETES_SERVICE_PORT")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", gateway.display()));
    let log = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    if log.contains("cannot reach the Kubernetes API") && !log.contains("bad flag") {
        Ok(())
    } else {
        Err(format!("{}: {log}", output.status))
    }
}

#[test]
fn chart_arguments_are_ones_the_operator_accepts() {
    let operator = workspace_binary("tidepool-operator", "tidepool-operator").unwrap();
    let all_on = scratch("all-on-args.yaml", ALL_ON);
    let renders = [
        render(&[]),
        render(&["-f", all_on.to_str().unwrap()]),
        render(&["--set", "agent.enabled=false,operator.logLevel=debug"]),
        render(&[
            "--set",
            "rbac.clusterWide=true,network.policies.enabled=false",
            "--set-json",
            "network.clusterCIDRs=[]",
        ]),
        render(&["--set", "rbac.namespaces={team-a},operator.sessionNamespace=team-a,examplePool.enabled=false"]),
        render(&[
            "--set-json",
            r#"fleet.regionCoordinates={"eu-west":{"latitude":50.11,"longitude":8.68},"us-east":{"latitude":39.04,"longitude":-77.49}}"#,
            "--set-json",
            r#"fleet.geoip={"volume":{"emptyDir":{}},"file":"GeoLite2-City.mmdb"}"#,
        ]),
        render(&["--set-json", RESULTS_STORE]),
        render(&["--set", "gateway.enabled=true"]),
        render(&["--set", "gateway.enabled=true,rbac.clusterWide=true,operator.sessionNamespace=team-a"]),
        render(&[
            "--set",
            "gateway.enabled=true,rbac.namespaces={tidepool,team-a},gateway.namespaces={team-a,tidepool}",
            "--set-json",
            r#"gateway.anonymous={"allow":["192.0.2.7/32"],"sessionsPerHour":0,"concurrentSessions":0,"mibPerHour":0}"#,
        ]),
    ];
    for objects in &renders {
        let args = operator_args(objects);
        accepts(&operator, &args).unwrap_or_else(|e| panic!("the operator refuses {args:?}: {e}"));
    }
    // The gateway takes what the chart gives it, wherever it is on.
    let gateway = workspace_binary("tidepool-gateway", "tidepool-gateway").unwrap();
    let with_gateway: Vec<&Vec<Value>> = renders
        .iter()
        .filter(|objects| inventory(objects).iter().any(|o| o == "Deployment tidepool/tidepool-gateway"))
        .collect();
    assert_eq!(with_gateway.len(), 4, "the renders with the gateway on");
    for objects in with_gateway {
        let args = gateway_args(objects);
        accepts(&gateway, &args).unwrap_or_else(|e| panic!("the gateway refuses {args:?}: {e}"));
        gateway_settles(&gateway, &args).unwrap_or_else(|e| panic!("the gateway refuses {args:?}: {e}"));
    }
    // Both gateway checks can fail: clap's on an unknown flag, the gateway's own on a bad range.
    let mut unknown = gateway_args(&renders[1]);
    unknown.push("--no-such-flag".into());
    assert!(accepts(&gateway, &unknown).expect_err("an unknown flag").contains("--no-such-flag"));
    let mut bad = gateway_args(&render(&["--set", "gateway.enabled=true"]));
    bad.push("--trusted-proxies=10.0.0.0/33".into());
    accepts(&gateway, &bad).expect("clap takes any text here");
    assert!(gateway_settles(&gateway, &bad).expect_err("a bad range").contains("trusted-proxies"));
    // The check can fail: an unknown flag or a bad value stops clap before --help.
    let mut unknown = operator_args(&renders[0]);
    unknown.push("--no-such-flag".into());
    let refusal = accepts(&operator, &unknown).expect_err("an unknown flag");
    assert!(refusal.contains("--no-such-flag"), "{refusal}");
    let mut bad = operator_args(&renders[0]);
    bad.push("--agent-port=high".into());
    accepts(&operator, &bad).expect_err("a bad port");
}

/// `kubectl auth can-i` as ServiceAccount `account` of the release namespace.
fn can_i(plane: &ControlPlane, account: &str, question: &str) -> bool {
    can_i_as(plane, &format!("system:serviceaccount:{NAMESPACE}:{account}"), question)
}

/// `kubectl auth can-i` as `user`.
fn can_i_as(plane: &ControlPlane, user: &str, question: &str) -> bool {
    let output = plane
        .kubectl()
        .args(["auth", "can-i", &format!("--as={user}")])
        .args(question.split_whitespace())
        .output()
        .unwrap();
    let answer = String::from_utf8_lossy(&output.stdout).trim().to_string();
    assert!(
        answer == "yes" || answer == "no",
        "can-i {question}: {answer} {}",
        String::from_utf8_lossy(&output.stderr)
    );
    answer == "yes"
}

/// What `kubectl auth can-i --list` shows for `user` in `namespace`.
fn rights(plane: &ControlPlane, user: &str, namespace: &str) -> String {
    run(plane.kubectl().args(["auth", "can-i", "--list", "-n", namespace, &format!("--as={user}")])).unwrap()
}

/// What the operator does, each of which it must be allowed: with the
/// defaults, pools, sessions, their pods and key Secrets in the release
/// namespace only.
const OPERATOR_MAY: &[&str] = &[
    "patch tubes.tidepool.dev -n tidepool",
    "patch tubes.tidepool.dev --subresource=status -n tidepool",
    "create tubes.tidepool.dev -n tidepool",
    "list pods -n tidepool",
    "watch pods -n tidepool",
    "get pods -n tidepool",
    "create pods -n tidepool",
    "patch pods -n tidepool",
    "delete pods -n tidepool",
    "get nodes",
    "list nodes",
    "watch nodes",
    "get secrets -n tidepool",
    "create secrets -n tidepool",
    "update secrets -n tidepool",
    "create events.events.k8s.io -n tidepool",
    "patch events.events.k8s.io -n tidepool",
    "create tokenreviews.authentication.k8s.io",
    "create subjectaccessreviews.authorization.k8s.io",
    "list warmpools.tidepool.dev -n tidepool",
    "watch warmpools.tidepool.dev -n tidepool",
    "get warmpools.tidepool.dev -n tidepool",
    "patch warmpools.tidepool.dev --subresource=status -n tidepool",
    "update warmpools.tidepool.dev --subresource=finalizers -n tidepool",
    "list testsessions.tidepool.dev -n tidepool",
    "watch testsessions.tidepool.dev -n tidepool",
    "get testsessions.tidepool.dev -n tidepool",
    "create testsessions.tidepool.dev -n tidepool",
    "delete testsessions.tidepool.dev -n tidepool",
    "patch testsessions.tidepool.dev --subresource=status -n tidepool",
    "list monitors.tidepool.dev -n tidepool",
    "watch monitors.tidepool.dev -n tidepool",
    "get monitors.tidepool.dev -n tidepool",
    "patch monitors.tidepool.dev --subresource=status -n tidepool",
    "update monitors.tidepool.dev --subresource=finalizers -n tidepool",
    "get backends.tidepool.dev",
    "list backends.tidepool.dev",
    "watch backends.tidepool.dev",
    "create backends.tidepool.dev",
    "patch backends.tidepool.dev",
    "patch backends.tidepool.dev --subresource=status",
    "create leases.coordination.k8s.io -n tidepool",
    "get leases.coordination.k8s.io/tidepool-operator -n tidepool",
    "update leases.coordination.k8s.io/tidepool-operator -n tidepool",
    "create daemonsets.apps -n tidepool",
    "patch daemonsets.apps/tidepool-agent -n tidepool",
    "list daemonsets.apps/tidepool-agent -n tidepool",
    "watch daemonsets.apps/tidepool-agent -n tidepool",
];

/// What the operator never needs, or, with the defaults, needs nowhere but
/// the release namespace (team-x is a namespace the chart does not name).
const OPERATOR_MAY_NOT: &[&str] = &[
    "list pods --all-namespaces",
    "watch pods --all-namespaces",
    "get pods -n team-x",
    "create pods -n team-x",
    "delete pods -n team-x",
    "get secrets -n team-x",
    "create secrets -n team-x",
    "list secrets --all-namespaces",
    "list secrets -n tidepool",
    "watch secrets -n tidepool",
    "delete secrets -n tidepool",
    "patch secrets -n tidepool",
    "create events.events.k8s.io -n team-x",
    "list warmpools.tidepool.dev --all-namespaces",
    "get warmpools.tidepool.dev -n team-x",
    "patch warmpools.tidepool.dev --subresource=status -n team-x",
    "list testsessions.tidepool.dev --all-namespaces",
    "create testsessions.tidepool.dev -n team-x",
    "delete nodes",
    "patch nodes",
    "create pods --subresource=exec -n tidepool",
    "update pods -n tidepool",
    "create serviceaccounts --subresource=token -n tidepool",
    "patch warmpools.tidepool.dev -n tidepool",
    "delete warmpools.tidepool.dev -n tidepool",
    "update testsessions.tidepool.dev -n tidepool",
    "delete backends.tidepool.dev",
    "update backends.tidepool.dev",
    "update tubes.tidepool.dev -n tidepool",
    "patch tubes.tidepool.dev -n team-x",
    "patch monitors.tidepool.dev -n tidepool",
    "get monitors.tidepool.dev -n team-x",
    "update leases.coordination.k8s.io/someone-else -n tidepool",
    "create leases.coordination.k8s.io -n kube-system",
    "patch daemonsets.apps/someone-else -n tidepool",
    "delete daemonsets.apps/tidepool-agent -n tidepool",
    "create daemonsets.apps -n kube-system",
    "create deployments.apps -n tidepool",
    "create networkpolicies.networking.k8s.io -n tidepool",
    "delete validatingadmissionpolicies.admissionregistration.k8s.io",
    "create clusterrolebindings.rbac.authorization.k8s.io",
    "impersonate users",
];

/// With rbac.clusterWide the namespaced rights reach every namespace; the
/// rest stays out of reach.
const CLUSTER_WIDE_OPERATOR_MAY: &[&str] = &[
    "list pods --all-namespaces",
    "create pods -n team-x",
    "get secrets -n team-x",
    "update secrets -n team-x",
    "list warmpools.tidepool.dev --all-namespaces",
    "create testsessions.tidepool.dev -n team-x",
];
const CLUSTER_WIDE_OPERATOR_MAY_NOT: &[&str] = &[
    "list secrets --all-namespaces",
    "watch secrets -n team-x",
    "delete secrets -n team-x",
    "create pods --subresource=exec -n team-x",
    "patch warmpools.tidepool.dev -n team-x",
    "delete nodes",
    "create leases.coordination.k8s.io -n team-x",
];

/// Things neither the agents nor the session pods may do.
const NOBODY_MAY: &[&str] = &[
    "create backends.tidepool.dev",
    "patch backends.tidepool.dev",
    "update backends.tidepool.dev",
    "patch backends.tidepool.dev --subresource=status",
    "get pods -n tidepool",
    "list pods --all-namespaces",
    "get secrets -n tidepool",
    "list secrets -n tidepool",
    "get nodes",
    "create tokenreviews.authentication.k8s.io",
    "create testsessions.tidepool.dev -n tidepool",
    "get warmpools.tidepool.dev -n tidepool",
    "patch tubes.tidepool.dev --subresource=status -n tidepool",
    "get leases.coordination.k8s.io -n tidepool",
    "create serviceaccounts --subresource=token -n tidepool",
];

/// What the gateway does, each of which it must be allowed, in the
/// namespace it serves.
const GATEWAY_MAY: &[&str] = &[
    "list testsessions.tidepool.dev -n tidepool",
    "watch testsessions.tidepool.dev -n tidepool",
    "get testsessions.tidepool.dev -n tidepool",
    "create testsessions.tidepool.dev -n tidepool",
    "delete testsessions.tidepool.dev -n tidepool",
    "patch testsessions.tidepool.dev -n tidepool",
    "create testsessions.tidepool.dev --subresource=relay -n tidepool",
    "list warmpools.tidepool.dev -n tidepool",
    "watch warmpools.tidepool.dev -n tidepool",
    "get warmpools.tidepool.dev -n tidepool",
    "list pods -n tidepool",
    "watch pods -n tidepool",
    "get pods -n tidepool",
];

/// What the gateway never needs: Secrets, writing pods, pools or sessions
/// other than through the operator (but for the sightings of clients it
/// patches onto sessions), and any namespace it does not serve.
const GATEWAY_MAY_NOT: &[&str] = &[
    "get secrets -n tidepool",
    "list secrets -n tidepool",
    "create pods -n tidepool",
    "delete pods -n tidepool",
    "patch pods -n tidepool",
    "create pods --subresource=exec -n tidepool",
    "create pods --subresource=portforward -n tidepool",
    "update testsessions.tidepool.dev -n tidepool",
    "patch testsessions.tidepool.dev --subresource=status -n tidepool",
    "patch testsessions.tidepool.dev -n team-x",
    "create warmpools.tidepool.dev -n tidepool",
    "patch warmpools.tidepool.dev -n tidepool",
    "delete warmpools.tidepool.dev -n tidepool",
    "list testsessions.tidepool.dev -n team-x",
    "create testsessions.tidepool.dev -n team-x",
    "create testsessions.tidepool.dev --subresource=relay -n team-x",
    "list warmpools.tidepool.dev -n team-x",
    "list pods -n team-x",
    "list pods --all-namespaces",
    "list testsessions.tidepool.dev --all-namespaces",
    "get nodes",
    "get backends.tidepool.dev",
    "create tokenreviews.authentication.k8s.io",
    "create subjectaccessreviews.authorization.k8s.io",
    "create serviceaccounts --subresource=token -n tidepool",
    "get leases.coordination.k8s.io -n tidepool",
    "get configmaps -n tidepool",
    "impersonate users",
];

/// Installs the chart into the harness and checks what it grants, by asking
/// the API server; then runs the real operator and a real agent with the
/// chart's ServiceAccounts and arguments.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chart_installs_and_each_account_has_only_what_it_needs() {
    let plane = ControlPlane::start_with(Options { crds: false, ..Options::default() }).await.unwrap();
    let client = plane.client().await.unwrap();
    external_crds::install(&plane, &external_crds::prometheus_operator().unwrap()).unwrap();
    for namespace in ["team-a", "team-b", "tidepool-check", "tidepool-wide", "restricted"] {
        run(plane.kubectl().args(["create", "namespace", namespace])).unwrap();
    }

    // Helm installs the CRDs from the chart's crds/, then the templates.
    let kubeconfig = plane.kubeconfig().to_str().unwrap().to_string();
    let install = ["--namespace", NAMESPACE, "--create-namespace", "--kubeconfig", &kubeconfig, "--timeout", "60s"];
    let notes = run(helm().args(["install", RELEASE]).arg(chart()).args(install)).unwrap();
    assert!(notes.contains("The operator works only in tidepool (rbac.namespaces)"), "{notes}");
    assert!(notes.contains("tidepool.dev/session-service-accounts="), "{notes}");
    // An upgrade that turns the gateway on installs it, and keeps the API
    // token the install made.
    let token = || {
        run(plane.kubectl().args(["get", "secret", "tidepool-api-token", "-n", NAMESPACE, "-o=jsonpath={.data.token}"]))
    };
    let first = token().unwrap();
    let notes =
        run(helm().args(["upgrade", RELEASE]).arg(chart()).args(install).args(["--set", "gateway.enabled=true"]))
            .unwrap();
    assert!(
        notes.contains("The gateway serves sessions in tidepool at\nhttp://tidepool-gateway.tidepool.svc:80."),
        "{notes}"
    );
    assert_eq!(token().unwrap(), first, "helm upgrade changed the API token");

    // Every option on, as a second release: the API server takes every
    // object. The first release's admission policy allows the second's
    // session account where its namespace lists it.
    let allow = "tidepool.dev/session-service-accounts=check-tidepool-session";
    run(plane.kubectl().args(["annotate", "namespace", "tidepool-check", allow])).unwrap();
    let all_on = scratch("all-on-dry-run.yaml", ALL_ON);
    // The harness has no Gateway API CRDs, so the HTTPRoute is checked by rendering only.
    let no_route = ["-f", all_on.to_str().unwrap(), "--set", "gateway.httpRoute.enabled=false"];
    let rendered = template("check", "tidepool-check", &no_route).unwrap();
    let rendered = scratch("check.yaml", &rendered);
    run(plane.kubectl().args(["apply", "--dry-run=server", "-f"]).arg(&rendered)).unwrap();

    // The operator may do each thing it does, and none of the things it never needs.
    for question in OPERATOR_MAY {
        assert!(can_i(&plane, "tidepool-operator", question), "the operator may not {question}");
    }
    for question in OPERATOR_MAY_NOT {
        assert!(!can_i(&plane, "tidepool-operator", question), "the operator may {question}");
    }
    // Cluster-wide rights, when chosen, as a third release's operator.
    let wide =
        template("wide", "tidepool-wide", &["--set", "rbac.clusterWide=true", "--show-only", "templates/rbac.yaml"]);
    run(plane.kubectl().args(["apply", "-f"]).arg(scratch("wide-rbac.yaml", &wide.unwrap()))).unwrap();
    let wide_operator = "system:serviceaccount:tidepool-wide:wide-tidepool-operator";
    for question in CLUSTER_WIDE_OPERATOR_MAY {
        assert!(can_i_as(&plane, wide_operator, question), "the cluster-wide operator may not {question}");
    }
    for question in CLUSTER_WIDE_OPERATOR_MAY_NOT {
        assert!(!can_i_as(&plane, wide_operator, question), "the cluster-wide operator may {question}");
    }
    // The gateway reads pools, sessions and pods, and has the session
    // verbs the operator's API reviews, where it serves and nowhere else.
    for question in GATEWAY_MAY {
        assert!(can_i(&plane, "tidepool-gateway", question), "the gateway may not {question}");
    }
    for question in GATEWAY_MAY_NOT {
        assert!(!can_i(&plane, "tidepool-gateway", question), "the gateway may {question}");
    }
    let gateway_user = format!("system:serviceaccount:{NAMESPACE}:tidepool-gateway");
    let unbound = rights(&plane, &format!("system:serviceaccount:{NAMESPACE}:nobody"), "default");
    assert_eq!(rights(&plane, &gateway_user, "default"), unbound, "the gateway's rights in default");
    // Routed paths give it one right more, cluster-wide: reading Backends.
    assert!(!can_i(&plane, "tidepool-gateway", "get backends.tidepool.dev"));
    let routed = [
        "--set",
        "gateway.enabled=true,gateway.routed.paths={/app}",
        "--set-json",
        r#"gateway.routed.tiers={"small":{"vcpu":1,"memoryMiB":64}}"#,
    ];
    run(helm().args(["upgrade", RELEASE]).arg(chart()).args(install).args(routed)).unwrap();
    assert!(can_i(&plane, "tidepool-gateway", "get backends.tidepool.dev"), "the routing gateway may not get backends");
    for question in
        ["list backends.tidepool.dev", "patch backends.tidepool.dev", "get backends.tidepool.dev --subresource=status"]
    {
        assert!(!can_i(&plane, "tidepool-gateway", question), "the routing gateway may {question}");
    }
    for question in GATEWAY_MAY_NOT.iter().filter(|q| !q.starts_with("get backends")) {
        assert!(!can_i(&plane, "tidepool-gateway", question), "the routing gateway may {question}");
    }
    // The agents and the session pods have what every account has, nothing more.
    for account in ["tidepool-agent", "tidepool-session"] {
        for question in NOBODY_MAY {
            assert!(!can_i(&plane, account, question), "{account} may {question}");
        }
        for namespace in [NAMESPACE, "default"] {
            let unbound = rights(&plane, &format!("system:serviceaccount:{NAMESPACE}:nobody"), namespace);
            let user = format!("system:serviceaccount:{NAMESPACE}:{account}");
            assert_eq!(rights(&plane, &user, namespace), unbound, "{account}'s rights in {namespace}");
        }
    }

    // The operator and session pods pass the restricted Pod Security Standard.
    let restricted = "pod-security.kubernetes.io/enforce=restricted";
    run(plane.kubectl().args(["label", "namespace", "restricted", restricted])).unwrap();
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), "restricted");
    eventually(Duration::from_secs(30), "the default ServiceAccount in restricted", || async {
        accounts.get_opt("default").await.ok().flatten()
    })
    .await
    .unwrap();
    let objects = render(&["--set", "gateway.enabled=true"]);
    let deployment = find(&objects, "Deployment", "tidepool-operator");
    let pool = find(&objects, "WarmPool", "edge");
    let gateway = find(&objects, "Deployment", "tidepool-gateway");
    for (name, template) in [
        ("operator", &deployment["spec"]["template"]),
        ("session", &pool["spec"]["template"]),
        ("gateway", &gateway["spec"]["template"]),
    ] {
        pod_security(&plane, name, template).unwrap_or_else(|e| panic!("the {name} pod is not restricted: {e}"));
    }

    // The NetworkPolicies as the API server keeps them say what they should.
    let policies: Api<NetworkPolicy> = Api::namespaced(client.clone(), NAMESPACE);
    let kept = |name: &'static str| {
        let policies = policies.clone();
        async move { serde_yaml::to_value(policies.get(name).await.unwrap().spec.unwrap()).unwrap() }
    };
    assert_session_policy(
        &kept("tidepool-sessions").await,
        ("kube-system", "k8s-app", "kube-dns"),
        &["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "169.254.0.0/16", "168.63.129.16/32"],
        &["fc00::/7", "fe80::/10", "fd00:ec2::254/128"],
    );
    let operator_policy = kept("tidepool-operator").await;
    assert_eq!(ports(&operator_policy["ingress"][0]["ports"]), ["8080/TCP"]);
    let operator_pods = &deployment["spec"]["template"]["metadata"]["labels"];
    assert!(selects(&operator_policy["podSelector"], operator_pods), "the operator's policy misses its pods");
    let agent_policy = kept("tidepool-agent").await;
    assert_eq!(ports(&agent_policy["ingress"][0]["ports"]), ["9101/TCP"]);
    let gateway_policy = kept("tidepool-gateway").await;
    assert_eq!(ports(&gateway_policy["ingress"][0]["ports"]), ["8080/TCP", "8080/UDP", "9090/TCP"]);
    let gateway_pods = &gateway["spec"]["template"]["metadata"]["labels"];
    assert!(selects(&gateway_policy["podSelector"], gateway_pods), "the gateway's policy misses its pods");

    run_the_operator_and_an_agent(&plane, &client, &agent_policy).await;
}

/// A server-side dry run of a Pod made from `template` in the namespace
/// "restricted"; its ServiceAccount is left out, as that namespace has none.
fn pod_security(plane: &ControlPlane, name: &str, template: &Value) -> Result<String, String> {
    let mut spec = template["spec"].clone();
    for field in ["serviceAccountName", "serviceAccount"] {
        spec.as_mapping_mut().unwrap().remove(field);
    }
    let pod = serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": { "name": name, "namespace": "restricted" },
        "spec": serde_json::to_value(&spec).unwrap(),
    });
    let file = scratch(&format!("pod-{name}.json"), &pod.to_string());
    run(plane.kubectl().args(["create", "--dry-run=server", "-f"]).arg(file))
}

/// The real operator with the chart's arguments, as the chart's operator
/// account: it must lead, fill the example pool, bind a session, make the
/// agent DaemonSet and take a real agent's reports, with no refusal in its
/// log. The session binary runs behind the pool's pods, and the real agent
/// with the DaemonSet's arguments.
async fn run_the_operator_and_an_agent(plane: &ControlPlane, client: &kube::Client, agent_policy: &Value) {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NAMESPACE);
    let secret = secrets.get("tidepool-api-token").await.unwrap();
    let token = String::from_utf8(secret.data.unwrap()["token"].0.clone()).unwrap();
    let token_file = scratch("api-token", &token);
    let port = free_port().unwrap();
    // The installed release's arguments (the gateway on), but listening on
    // loopback and reading the token from here.
    // The Service's name does not resolve here; the operator's own address does.
    let set = [
        ("--listen", format!("127.0.0.1:{port}")),
        ("--api-token-file", token_file.display().to_string()),
        ("--results-url", format!("http://127.0.0.1:{port}")),
    ];
    let mut args = tidepool_tests::with_flags(operator_args(&render(&["--set", "gateway.enabled=true"])), &set);
    let kubeconfig = plane.service_account_kubeconfig(NAMESPACE, "tidepool-operator").await.unwrap();
    let binary = workspace_binary("tidepool-operator", "tidepool-operator").unwrap();
    // Every node and agent of the harness is on loopback.
    args.push("--allow-local-backend-addresses".to_string());
    let env = [("KUBECONFIG", kubeconfig.to_str().unwrap()), ("POD_NAME", "tidepool-operator-0")];
    // The session binary behind each of the example pool's pods, as a kubelet would run it.
    let session = workspace_binary("tidepool-session", "tidepool-session").unwrap();
    let runner = PodRunner::start(client.clone(), NAMESPACE, ALL_POOL_PODS, session, plane.dir().to_path_buf());
    let operator = plane.spawn("operator", &binary, &args, &env).unwrap();
    let url = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let metrics = || async { http.get(format!("{url}/metrics")).send().await.ok()?.text().await.ok() };
    eventually(Duration::from_secs(30), "the operator to lead", || async {
        metrics().await.filter(|m| m.lines().any(|l| l == "tidepool_leader 1"))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", operator.log_tail(30)));

    let pools: Api<WarmPool> = Api::namespaced(client.clone(), NAMESPACE);
    eventually(Duration::from_secs(60), "the example pool to be warm", || async {
        (pools.get("edge").await.ok()?.status?.warm == 3).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", operator.log_tail(30)));
    // Each warm pod's session process runs with the environment the chart
    // and the operator gave it.
    let pods: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
    let listed = pods.list(&ListParams::default().labels(POOL_PODS)).await.unwrap().items;
    // The sessions' NetworkPolicy is for the pods the operator makes, with the ports they serve.
    let policies: Api<NetworkPolicy> = Api::namespaced(client.clone(), NAMESPACE);
    let sessions = serde_yaml::to_value(policies.get("tidepool-sessions").await.unwrap().spec.unwrap()).unwrap();
    for pod in &listed {
        let labels = serde_yaml::to_value(&pod.metadata.labels).unwrap();
        assert!(selects(&sessions["podSelector"], &labels), "the sessions' policy misses {}", pod.name_any());
        let served = serde_yaml::to_value(&pod.spec.as_ref().unwrap().containers[0].ports).unwrap();
        let allowed = ports(&sessions["ingress"][0]["ports"]);
        for port in served.as_sequence().unwrap() {
            let by_name = format!("{}/{}", str_of(&port["name"]), str_of(&port["protocol"]));
            assert!(allowed.contains(&by_name), "{by_name} is not let in: {allowed:?}");
        }
    }
    let addresses: Vec<(String, String)> = listed
        .into_iter()
        .filter_map(|pod| Some((pod.name_any(), format!("http://{}:8080", pod.status?.pod_ip?))))
        .collect();
    assert!(addresses.len() >= 3, "{addresses:?}");
    for (pod, address) in &addresses {
        eventually(Duration::from_secs(30), &format!("{address}/health"), || async {
            http.get(format!("{address}/health")).send().await.ok()?.status().is_success().then_some(())
        })
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", tail(&plane.dir().join(format!("pod-{pod}.log")))));
    }
    let session_metrics = http.get(format!("{}/metrics", addresses[0].1)).send().await.unwrap().text().await.unwrap();
    check_metrics("session pod", &session_metrics);

    let created = http
        .post(format!("{url}/api/v1/sessions"))
        .bearer_auth(token.trim())
        .json(&serde_json::json!({ "pool": "edge" }))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status().as_u16(), 201, "{}", created.text().await.unwrap());
    run_the_gateway(plane, &url).await;

    let daemonsets: Api<DaemonSet> = Api::namespaced(client.clone(), NAMESPACE);
    let daemonset = eventually(Duration::from_secs(30), "the agent DaemonSet", || async {
        daemonsets.get_opt("tidepool-agent").await.ok().flatten()
    })
    .await
    .unwrap();
    // The agents' NetworkPolicy is for the pods the operator's DaemonSet makes.
    let agent_pods = serde_yaml::to_value(&daemonset.spec.as_ref().unwrap().template.metadata).unwrap();
    assert!(selects(&agent_policy["podSelector"], &agent_pods["labels"]), "the agents' policy misses {agent_pods:?}");
    let agent = run_an_agent(plane, client, &daemonset, &url).await;
    let backends: Api<Backend> = Api::all(client.clone());
    eventually(Duration::from_secs(30), "the agent's Backend", || async {
        backends.get_opt(&agent.node).await.ok().flatten()?.status.map(|_| ())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}\n{}", operator.log_tail(30), agent.process.log_tail(30)));

    // Both /metrics pass promtool.
    let operator_metrics = metrics().await.unwrap();
    assert!(operator_metrics.contains("tidepool_agent_reports_total{result=\"accepted\"}"), "{operator_metrics}");
    check_metrics("operator", &operator_metrics);
    let agent_metrics = http.get(format!("{}/metrics", agent.url)).send().await.unwrap().text().await.unwrap();
    assert!(agent_metrics.contains("tidepool_agent_cpu_cores"), "{agent_metrics}");
    check_metrics("agent", &agent_metrics);

    // The DaemonSet the operator made is not fit for a restricted namespace
    // (host network, host paths): the check above can fail.
    let template = serde_yaml::to_value(&daemonset.spec.unwrap().template).unwrap();
    let refusal = pod_security(plane, "agent", &template).expect_err("the agent pod is privileged");
    assert!(refusal.contains("violates PodSecurity"), "{refusal}");

    // A WarmPool made with kubectl, and a session on it run end to end by
    // the CLI: through the API, a latency test against the real pod, and
    // the results reported back into the TestSession.
    let mut pool = find(&render(&[]), "WarmPool", "edge").clone();
    pool["metadata"] =
        serde_yaml::to_value(serde_json::json!({ "name": "kubectl-made", "namespace": NAMESPACE })).unwrap();
    pool["spec"]["size"] = Value::from(1);
    let manifest = scratch("kubectl-made.yaml", &serde_yaml::to_string(&pool).unwrap());
    run(plane.kubectl().args(["apply", "-f"]).arg(&manifest)).unwrap();
    eventually(Duration::from_secs(60), "the kubectl-made pool to be warm", || async {
        let warm = pools.get("kubectl-made").await.ok()?.status?.warm == 1;
        (warm && runner.running().len() >= 4).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", operator.log_tail(30)));
    let cli = workspace_binary("tidepool-cli", "tidepool").unwrap();
    let token_path = token_file.display().to_string();
    let output = Command::new(&cli)
        .args(["run", "--operator", &url, "--api-token-file", &token_path, "--pool", "kubectl-made", "-n", NAMESPACE])
        .args(["--profile", "latency", "--json"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    assert!(output.status.success(), "tidepool run: {stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["reported"], true, "{report}");
    let sessions: Api<tidepool_crds::TestSession> = Api::namespaced(client.clone(), NAMESPACE);
    let name = report["name"].as_str().unwrap().to_string();
    eventually(Duration::from_secs(20), "the CLI's session to hold its results", || async {
        let results = sessions.get(&name).await.ok()?.status?.results?;
        results.latency.filter(|l| l.samples > 0).map(|_| ())
    })
    .await
    .unwrap();

    // A real Prometheus scrapes the operator, the agent and the session pods,
    // and its HTTP API has the series with sane values.
    let mut session_targets: Vec<String> = pods
        .list(&ListParams::default().labels(ALL_POOL_PODS))
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|pod| runner.running().contains(&pod.name_any()))
        .filter_map(|pod| Some(format!("{}:8080", pod.status?.pod_ip?)))
        .collect();
    session_targets.sort();
    let prometheus = Prometheus::start(
        plane,
        &[
            ("operator", vec![url.trim_start_matches("http://").to_string()]),
            ("agent", vec![agent.url.trim_start_matches("http://").to_string()]),
            ("session", session_targets.clone()),
        ],
    );
    let targets = 2 + session_targets.len();
    eventually(Duration::from_secs(60), "Prometheus to scrape every target up", || async {
        let up = prometheus.query(&http, "sum(up)").await?;
        (up == targets as f64).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", prometheus.process.log_tail(30)));
    // (query, the least sane value)
    let expectations = [
        ("tidepool_leader", 1.0),
        ("sum(tidepool_session_create_to_ready_seconds_count)", 2.0),
        ("sum(tidepool_pool_pods{state=\"warm\"})", 1.0),
        ("sum(tidepool_agent_reports_total{result=\"accepted\"})", 1.0),
        ("sum(tidepool_agent_cpu_cores)", 1.0),
        ("max(tidepool_agent_memory_total_bytes)", 1e6),
        ("count(tidepool_session_requests_total)", 1.0),
    ];
    for (query, least) in expectations {
        let value = eventually(Duration::from_secs(20), query, || async {
            prometheus.query(&http, query).await.filter(|v| *v >= least)
        })
        .await
        .unwrap_or_else(|e| panic!("{e}: Prometheus has no sane {query}"));
        assert!(value.is_finite(), "{query} = {value}");
    }

    let log = std::fs::read_to_string(&operator.log).unwrap();
    assert!(!log.to_lowercase().contains("forbidden"), "the operator was refused something:\n{log}");
}

/// The real gateway with the chart's arguments, as the chart's gateway
/// account, in front of the real operator at `operator_url`: its watches
/// sync with its Role's rights, and the operator's reviews let its own
/// token create, read and delete a session, as they do for the sessions it
/// starts for anonymous clients.
async fn run_the_gateway(plane: &ControlPlane, operator_url: &str) {
    let (port, admin_port) = (free_port().unwrap(), free_port().unwrap());
    let audience = "https://kubernetes.default.svc.cluster.local";
    let token = plane.service_account_token(NAMESPACE, "tidepool-gateway", audience, None).await.unwrap();
    let token_file = scratch("gateway-token", &token);
    // The image's UI build stands in as one page.
    let ui_index = scratch("ui/index.html", "<!doctype html><title>Tidepool</title>");
    // The Service's name does not resolve here.
    let set = [
        ("--listen", format!("127.0.0.1:{port}")),
        ("--admin-listen", format!("127.0.0.1:{admin_port}")),
        // The relay's UDP beside the users' TCP port, as the chart has it.
        ("--udp-listen", format!("127.0.0.1:{port}")),
        ("--udp-advertised-port", port.to_string()),
        ("--operator-url", operator_url.to_string()),
        ("--ui-dir", ui_index.parent().unwrap().display().to_string()),
    ];
    let mut args = tidepool_tests::with_flags(gateway_args(&render(&["--set", "gateway.enabled=true"])), &set);
    // Where the kubelet would mount the account's token.
    args.push(format!("--token-file={}", token_file.display()));
    let kubeconfig = plane.service_account_kubeconfig(NAMESPACE, "tidepool-gateway").await.unwrap();
    let binary = workspace_binary("tidepool-gateway", "tidepool-gateway").unwrap();
    let env = [("KUBECONFIG", kubeconfig.to_str().unwrap()), ("NO_COLOR", "1")];
    let mut gateway = plane.spawn("gateway", &binary, &args, &env).unwrap();
    let (url, admin) = (format!("http://127.0.0.1:{port}"), format!("http://127.0.0.1:{admin_port}"));
    let http = reqwest::Client::new();
    eventually(Duration::from_secs(30), "the gateway's caches to sync", || async {
        http.get(format!("{admin}/readyz")).send().await.ok()?.status().is_success().then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", gateway.log_tail(30)));

    // The web UI, from the directory the chart names.
    let page = http.get(format!("{url}/")).send().await.unwrap();
    let html = page.headers()["content-type"] == "text/html; charset=utf-8";
    let page = page.text().await.unwrap();
    assert!(html && page.contains("<title>Tidepool</title>"), "{page}\n{args:?}");

    let created = http
        .post(format!("{url}/api/v1/sessions"))
        .bearer_auth(token.trim())
        .json(&serde_json::json!({ "pool": "edge" }))
        .send()
        .await
        .unwrap();
    let status = created.status().as_u16();
    let view: serde_json::Value = created.json().await.unwrap();
    assert_eq!(status, 201, "a create through the gateway: {view}\n{}", gateway.log_tail(30));
    // The session's streams come back through the gateway.
    assert!(view["endpoint"].as_str().unwrap_or_default().starts_with(&url), "{view}");
    let name = view["name"].as_str().unwrap();
    let one = format!("{url}/api/v1/sessions/{name}?namespace={NAMESPACE}");
    let read = http.get(&one).bearer_auth(token.trim()).send().await.unwrap();
    assert_eq!(read.status().as_u16(), 200);
    // The chart's Role lets the gateway relay (create testsessions/relay),
    // so the operator signs it a relay ticket for the session's pod.
    let read: serde_json::Value = read.json().await.unwrap();
    assert!(read["relay"].as_str().is_some_and(|t| !t.is_empty()), "no relay ticket for the gateway: {read}");
    let ended = http.delete(&one).bearer_auth(token.trim()).send().await.unwrap();
    assert!(ended.status().is_success(), "{}: {}", ended.status(), ended.text().await.unwrap());

    let metrics = http.get(format!("{admin}/metrics")).send().await.unwrap().text().await.unwrap();
    check_metrics("gateway", &metrics);
    gateway.stop(Duration::from_secs(5));
    let log = std::fs::read_to_string(&gateway.log).unwrap();
    assert!(!log.to_lowercase().contains("forbidden"), "the gateway was refused something:\n{log}");
}

/// Debian's Prometheus, scraping fixed targets every second.
struct Prometheus {
    process: tidepool_tests::Process,
    url: String,
}

impl Prometheus {
    fn start(plane: &ControlPlane, jobs: &[(&str, Vec<String>)]) -> Self {
        let mut config = String::from("global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n");
        for (job, targets) in jobs {
            let list: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
            config.push_str(&format!(
                "  - job_name: {job}\n    static_configs:\n      - targets: [{}]\n",
                list.join(", ")
            ));
        }
        let file = scratch("prometheus.yml", &config);
        let port = free_port().unwrap();
        let data = plane.dir().join("prometheus-data");
        let args = [
            format!("--config.file={}", file.display()),
            format!("--storage.tsdb.path={}", data.display()),
            format!("--web.listen-address=127.0.0.1:{port}"),
        ];
        let process = plane.spawn("prometheus", Path::new("/usr/bin/prometheus"), &args, &[]).unwrap();
        Self { process, url: format!("http://127.0.0.1:{port}") }
    }

    /// The value of an instant query that yields one sample, if it does.
    async fn query(&self, http: &reqwest::Client, query: &str) -> Option<f64> {
        let response = http.get(format!("{}/api/v1/query", self.url)).query(&[("query", query)]).send().await.ok()?;
        let body: serde_json::Value = response.json().await.ok()?;
        let value = body["data"]["result"].get(0)?["value"][1].as_str()?;
        value.parse().ok()
    }
}

/// The end of a log file.
fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

fn check_metrics(what: &str, text: &str) {
    let file = scratch(&format!("{what}.metrics"), text);
    let stdin = std::fs::File::open(file).unwrap();
    run(Command::new(promtool()).args(["check", "metrics"]).stdin(stdin))
        .unwrap_or_else(|e| panic!("promtool check metrics on the {what}'s /metrics: {e}"));
}

struct Agent {
    process: tidepool_tests::Process,
    node: String,
    url: String,
}

/// Runs the real agent as the DaemonSet's pod on one node would: its
/// arguments (checked as they are, then with local paths and ports), its
/// environment, and a token of the chart's agent account bound to that pod.
async fn run_an_agent(plane: &ControlPlane, client: &kube::Client, daemonset: &DaemonSet, operator_url: &str) -> Agent {
    let binary = workspace_binary("tidepool-agent", "tidepool-agent").unwrap();
    let pod_spec = daemonset.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    let container = &pod_spec.containers[0];
    let args = container.args.clone().unwrap();
    accepts(&binary, &args).unwrap_or_else(|e| panic!("the agent refuses the DaemonSet's {args:?}: {e}"));

    let pods: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
    let selector = ListParams::default().labels("app.kubernetes.io/name=tidepool-agent");
    let pod = eventually(Duration::from_secs(60), "an agent pod", || async {
        pods.list(&selector)
            .await
            .ok()?
            .items
            .into_iter()
            .find(|p| p.spec.as_ref().is_some_and(|s| s.node_name.is_some()))
    })
    .await
    .unwrap();
    let node = pod.spec.as_ref().unwrap().node_name.clone().unwrap();
    let audience = pod_spec.volumes.as_ref().unwrap().iter().find_map(|v| {
        v.projected.as_ref()?.sources.as_ref()?.iter().find_map(|s| s.service_account_token.as_ref()?.audience.clone())
    });
    let account = pod_spec.service_account_name.as_deref().unwrap();
    let token = plane
        .service_account_token(NAMESPACE, account, &audience.unwrap(), Some((&pod.name_any(), &pod.uid().unwrap())))
        .await
        .unwrap();
    let token_file = scratch("agent-token", &token);
    let disk = token_file.parent().unwrap().to_path_buf();
    let port = free_port().unwrap();
    let fixtures = repo().join("agent/tests/fixtures/proc");
    let mut local = Vec::new();
    let mut values = args.iter();
    while let Some(flag) = values.next() {
        let value = values.next().unwrap_or_else(|| panic!("{flag} has no value in {args:?}"));
        let value = match flag.as_str() {
            "--operator-url" => operator_url.to_string(),
            "--token-file" => token_file.display().to_string(),
            "--listen" => format!("127.0.0.1:{port}"),
            "--proc-root" => fixtures.display().to_string(),
            "--disk-path" => disk.display().to_string(),
            _ => value.clone(),
        };
        local.extend([flag.clone(), value]);
    }
    let env: Vec<(String, String)> = container
        .env
        .clone()
        .unwrap_or_default()
        .into_iter()
        .map(|var| {
            let value = match var.value_from.and_then(|from| from.field_ref).map(|field| field.field_path) {
                Some(path) if path == "spec.nodeName" => node.clone(),
                Some(path) if path == "status.hostIP" => "127.0.0.1".to_string(),
                Some(path) => panic!("the agent's {} comes from {path}, which this test does not fill", var.name),
                None => var.value.unwrap_or_default(),
            };
            (var.name, value)
        })
        .collect();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let process = plane.spawn("agent", &binary, &local, &env).unwrap();
    Agent { process, node, url: format!("http://127.0.0.1:{port}") }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn argocd_manifests_pass_a_server_side_dry_run_against_argo_cds_crds() {
    let plane = ControlPlane::start_with(Options::api_server_only()).await.unwrap();
    external_crds::install(&plane, &external_crds::argo_cd().unwrap()).unwrap();
    run(plane.kubectl().args(["create", "namespace", "argocd"])).unwrap();
    let dir = repo().join("argocd");
    for file in ["project.yaml", "application.yaml"] {
        run(plane.kubectl().args(["apply", "--dry-run=server", "-f"]).arg(dir.join(file)))
            .unwrap_or_else(|e| panic!("argocd/{file}: {e}"));
    }

    // A broken copy is refused, naming the field: the dry run checks types
    // and, with kubectl's strict field validation, names.
    let application = std::fs::read_to_string(dir.join("application.yaml")).unwrap();
    for (from, to, words) in [
        ("prune: true", "prune: \"yes\"", "spec.syncPolicy.automated.prune"),
        ("selfHeal: true", "selfheal: true", "unknown field \"spec.syncPolicy.automated.selfheal\""),
        ("factor: 2", "factor: two", "spec.syncPolicy.retry.backoff.factor"),
    ] {
        assert!(application.contains(from), "argocd/application.yaml has no {from:?}");
        let broken = scratch("broken-application.yaml", &application.replacen(from, to, 1));
        let refusal = run(plane.kubectl().args(["apply", "--dry-run=server", "-f"]).arg(broken))
            .expect_err(&format!("{to:?} accepted"));
        assert!(refusal.contains(words), "{to:?}: no {words:?} in {refusal}");
    }
}

/// Whether `name` matches an Argo CD whitelist pattern (`*` or `*.suffix`).
fn whitelisted(pattern: &str, name: &str) -> bool {
    match pattern.strip_prefix('*') {
        Some(suffix) => name.ends_with(suffix),
        None => pattern == name,
    }
}

#[test]
fn the_argocd_project_allows_every_object_the_chart_makes() {
    let project: Value =
        serde_yaml::from_str(&std::fs::read_to_string(repo().join("argocd/project.yaml")).unwrap()).unwrap();
    let spec = &project["spec"];
    let entries = |list: &str| -> Vec<(String, String, String)> {
        spec[list]
            .as_sequence()
            .unwrap_or_else(|| panic!("argocd/project.yaml has no {list}"))
            .iter()
            .map(|e| {
                let name = e["name"].as_str().unwrap_or("*");
                (str_of(&e["group"]).to_string(), str_of(&e["kind"]).to_string(), name.to_string())
            })
            .collect()
    };
    let (cluster, namespaced) = (entries("clusterResourceWhitelist"), entries("namespaceResourceWhitelist"));
    let destinations: Vec<&str> =
        spec["destinations"].as_sequence().unwrap().iter().map(|d| str_of(&d["namespace"])).collect();
    const CLUSTER_SCOPED: [&str; 6] = [
        "Namespace",
        "CustomResourceDefinition",
        "ClusterRole",
        "ClusterRoleBinding",
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
    ];
    let mut objects = render(&["--include-crds"]);
    // The gateway's objects too, each optional one on.
    let gateway = "gateway.enabled=true,gateway.autoscaling.enabled=true,gateway.ingress.enabled=true,\
                   gateway.httpRoute.enabled=true,gateway.httpRoute.parentRefs[0].name=public";
    objects.extend(
        render(&["--set", gateway]).into_iter().filter(|o| str_of(&o["metadata"]["name"]).ends_with("-gateway")),
    );
    // The namespace itself, which the Application's CreateNamespace makes.
    objects.push(
        serde_yaml::from_str(&format!("{{apiVersion: v1, kind: Namespace, metadata: {{name: {NAMESPACE}}}}}")).unwrap(),
    );
    for object in &objects {
        let kind = str_of(&object["kind"]);
        let api_version = str_of(&object["apiVersion"]);
        let group = api_version.rsplit_once('/').map_or("", |(group, _)| group);
        let name = str_of(&object["metadata"]["name"]);
        if CLUSTER_SCOPED.contains(&kind) {
            assert!(
                cluster.iter().any(|(g, k, n)| g == group && k == kind && whitelisted(n, name)),
                "argocd/project.yaml's clusterResourceWhitelist does not allow {kind} {name} ({group})"
            );
        } else {
            assert!(
                namespaced.iter().any(|(g, k, _)| g == group && k == kind),
                "argocd/project.yaml's namespaceResourceWhitelist does not allow {kind} ({group})"
            );
            let namespace = object["metadata"]["namespace"].as_str().unwrap_or(NAMESPACE);
            assert!(
                destinations.contains(&namespace),
                "argocd/project.yaml has no destination {namespace} for {kind} {name}"
            );
        }
    }
}

/// The Dockerfile's instructions by stage: (stage name, base, instructions),
/// with continued lines joined.
fn dockerfile_stages(text: &str) -> Vec<(String, String, Vec<String>)> {
    let mut stages: Vec<(String, String, Vec<String>)> = Vec::new();
    let joined = text.replace("\\\n", " ");
    for line in joined.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let words: Vec<&str> = line.split_whitespace().collect();
        if words[0] == "FROM" {
            let name = if words.len() == 4 && words[2].eq_ignore_ascii_case("AS") { words[3] } else { "" };
            stages.push((name.to_string(), words[1].to_string(), Vec::new()));
        } else if let Some(stage) = stages.last_mut() {
            stage.2.push(words.join(" "));
        }
    }
    stages
}

#[test]
fn chart_images_come_from_a_dockerfile_target_per_program() {
    let stages = dockerfile_stages(&std::fs::read_to_string(repo().join("Dockerfile")).unwrap());
    let stage = |name: &str| stages.iter().find(|s| s.0 == name).unwrap_or_else(|| panic!("no stage {name}"));
    let build = stage("build");
    let runtime = stage("runtime");
    assert!(runtime.1.starts_with("gcr.io/distroless/") && runtime.1.ends_with(":nonroot"), "{}", runtime.1);
    assert!(runtime.2.contains(&"USER 65532:65532".to_string()), "the images run as 65532");
    let defaults: Value = serde_yaml::from_str(&std::fs::read_to_string(chart().join("values.yaml")).unwrap()).unwrap();
    let cargo = build.2.iter().find(|i| i.contains("cargo build")).expect("a cargo build");
    assert!(cargo.contains("--release --locked"), "{cargo}");
    for (target, value) in
        [("operator", "operator"), ("agent", "agent"), ("session", "session"), ("gateway", "gateway")]
    {
        // The chart's image name is the program's name.
        let program = str_of(&defaults["images"][value]);
        assert!(cargo.contains(&format!("--bin {program}")), "{program} is not built: {cargo}");
        let (_, base, instructions) = stage(target);
        assert_eq!(base, "runtime", "the {target} image is not on the small non-root base");
        let copy = format!("COPY --from=build /out/{program} /usr/local/bin/{program}");
        assert!(instructions.contains(&copy), "{target}: {instructions:?}");
        let entrypoint = format!("ENTRYPOINT [\"/usr/local/bin/{program}\"]");
        assert!(instructions.contains(&entrypoint), "{target}: {instructions:?}");
        // One binary each, and the gateway the web UI: nothing else is copied in.
        let copies = if target == "gateway" { 2 } else { 1 };
        assert_eq!(instructions.iter().filter(|i| i.starts_with("COPY")).count(), copies, "{target}");
    }
    // The web UI is built from npm's packages in a stage of its own and
    // lands where the chart's --ui-dir points.
    let web = stage("web");
    assert!(web.2.iter().any(|i| i.contains("npm ci")) && web.2.iter().any(|i| i.contains("npm run build")), "{web:?}");
    assert!(stage("gateway").2.contains(&"COPY --from=web /web/dist /usr/share/tidepool/ui".to_string()));
    let rendered = render(&["--set", "gateway.enabled=true"]);
    assert!(gateway_args(&rendered).contains(&"--ui-dir=/usr/share/tidepool/ui".to_string()));
    // The gateway's users' and admin ports, as the chart's Deployment names them.
    assert!(stage("gateway").2.contains(&"EXPOSE 8080 9090".to_string()), "{:?}", stage("gateway").2);
    let ignored = std::fs::read_to_string(repo().join(".dockerignore")).unwrap();
    for path in ["target", ".git", "web/node_modules", "web/dist"] {
        assert!(ignored.lines().any(|l| l.trim() == path), ".dockerignore leaves {path} in the build context");
    }
}
