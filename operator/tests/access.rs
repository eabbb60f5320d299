//! Who may do what through the operator's API, on the real control plane:
//! callers are Kubernetes identities with their own RBAC, names are checked
//! before any API path, errors do not leak the operator's rights, each
//! caller holds few sessions, and forged results credentials cost the API
//! server nothing and all look alike.

mod common;

use std::time::{Duration, Instant};

use common::{Cluster, TOKEN};
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding, RoleRef, Subject};
use kube::ResourceExt;
use kube::api::{Api, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use tidepool_crds::TestSession;

const AUDIENCE: &str = "https://kubernetes.default.svc.cluster.local";

fn rule(group: &str, resources: &[&str], verbs: &[&str]) -> PolicyRule {
    PolicyRule {
        api_groups: Some(vec![group.into()]),
        resources: Some(resources.iter().map(|r| r.to_string()).collect()),
        verbs: verbs.iter().map(|v| v.to_string()).collect(),
        ..Default::default()
    }
}

fn subject(name: &str) -> Subject {
    Subject {
        kind: "ServiceAccount".into(),
        name: name.into(),
        namespace: Some("default".into()),
        ..Default::default()
    }
}

/// Grants ServiceAccount `default/<account>` `verbs` on TestSessions in `namespace`.
async fn grant(client: &kube::Client, namespace: &str, account: &str, verbs: &[&str]) {
    let rules = vec![rule("tidepool.dev", &["testsessions"], verbs)];
    bind_role(client, namespace, &format!("{account}-sessions"), account, rules).await;
}

/// A Role `name` in `namespace` with `rules`, bound to ServiceAccount `default/<account>`.
async fn bind_role(client: &kube::Client, namespace: &str, name: &str, account: &str, rules: Vec<PolicyRule>) {
    let role = Role { metadata: ObjectMeta { name: Some(name.into()), ..Default::default() }, rules: Some(rules) };
    let binding = RoleBinding {
        metadata: ObjectMeta { name: Some(name.into()), ..Default::default() },
        role_ref: RoleRef { api_group: "rbac.authorization.k8s.io".into(), kind: "Role".into(), name: name.into() },
        subjects: Some(vec![subject(account)]),
    };
    Api::<Role>::namespaced(client.clone(), namespace).create(&PostParams::default(), &role).await.unwrap();
    Api::<RoleBinding>::namespaced(client.clone(), namespace).create(&PostParams::default(), &binding).await.unwrap();
}

struct Http {
    base: String,
    client: reqwest::Client,
}

impl Http {
    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        token: &str,
        body: Option<Value>,
    ) -> (u16, Value, Option<String>) {
        let mut request = self.client.request(method, format!("{}{path}", self.base)).bearer_auth(token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let code = response.status().as_u16();
        let retry = response.headers().get("retry-after").and_then(|v| v.to_str().ok()).map(String::from);
        (code, response.json().await.unwrap_or(Value::Null), retry)
    }

    async fn create(&self, token: &str, body: Value) -> (u16, Value) {
        let (code, body, _) = self.send(reqwest::Method::POST, "/api/v1/sessions", token, Some(body)).await;
        (code, body)
    }
}

fn metric(text: &str, series: &str) -> f64 {
    text.lines().find_map(|l| l.strip_prefix(series).map(|v| v.trim().parse().unwrap_or(0.0))).unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_act_with_their_own_kubernetes_rights_and_no_more() {
    let cluster = Cluster::start(1).await;
    let client = &cluster.client;
    let team_b =
        Namespace { metadata: ObjectMeta { name: Some("team-b".into()), ..Default::default() }, ..Default::default() };
    Api::<Namespace>::all(client.clone()).create(&PostParams::default(), &team_b).await.unwrap();
    let operator = cluster.operator("operator-0", &["--namespaces=default,team-b", "--sessions-per-caller=2"]).await;
    cluster.pool("edge", 3).await;
    let pools: Api<tidepool_crds::WarmPool> = Api::namespaced(client.clone(), "default");
    let cap = json!({ "spec": { "maxSessionTTLSeconds": 600, "sessionTTLSeconds": 300 } });
    pools.patch("edge", &PatchParams::default(), &Patch::Merge(&cap)).await.unwrap();
    cluster.wait_warm("edge", 3, Duration::from_secs(60)).await;

    let plane = &cluster.plane;
    let alice = plane.service_account_token("default", "alice", AUDIENCE, None).await.unwrap();
    let bob = plane.service_account_token("default", "bob", AUDIENCE, None).await.unwrap();
    let carol = plane.service_account_token("default", "carol", AUDIENCE, None).await.unwrap();
    grant(client, "default", "alice", &["create", "get", "delete"]).await;
    grant(client, "default", "bob", &["create"]).await;
    let http = Http { base: operator.url.clone(), client: reqwest::Client::new() };

    // Alice may: she gets her session, with its credentials.
    let (code, session) = http.create(&alice, json!({ "pool": "edge" })).await;
    assert_eq!(code, 201, "{session}");
    assert!(session["token"].is_string() && session["binding"].is_string(), "{session}");
    let name = session["name"].as_str().unwrap().to_string();
    let sessions: Api<TestSession> = Api::namespaced(client.clone(), "default");
    let made = sessions.get(&name).await.unwrap();
    assert_eq!(made.metadata.annotations.unwrap()["tidepool.dev/created-by"], "system:serviceaccount:default:alice");
    let (code, read, _) = http.send(reqwest::Method::GET, &format!("/api/v1/sessions/{name}"), &alice, None).await;
    assert_eq!(code, 200, "{read}");
    assert!(read["token"].is_string());

    // Everything else is refused, before anything is made.
    type Case<'a> = (&'a str, reqwest::Method, String, &'a str, Option<Value>, u16, &'a str);
    let get = reqwest::Method::GET;
    let post = reqwest::Method::POST;
    let cases: Vec<Case> = vec![
        (
            "no rights",
            post.clone(),
            "/api/v1/sessions".into(),
            &carol,
            Some(json!({ "pool": "edge" })),
            403,
            "may not create",
        ),
        (
            "create without get (no credentials)",
            post.clone(),
            "/api/v1/sessions".into(),
            &bob,
            Some(json!({ "pool": "edge" })),
            403,
            "may not get",
        ),
        (
            "reading another's session without get",
            get.clone(),
            format!("/api/v1/sessions/{name}"),
            &carol,
            None,
            403,
            "may not get",
        ),
        (
            "deleting without delete",
            reqwest::Method::DELETE,
            format!("/api/v1/sessions/{name}"),
            &bob,
            None,
            403,
            "may not delete",
        ),
        (
            "a made-up token",
            post.clone(),
            "/api/v1/sessions".into(),
            "aaaa.bbbb.cccc",
            Some(json!({ "pool": "edge" })),
            401,
            "not accepted",
        ),
        (
            "the static token outside its namespaces",
            post.clone(),
            "/api/v1/sessions".into(),
            TOKEN,
            Some(json!({ "pool": "edge", "namespace": "team-b" })),
            403,
            "may not act in namespace team-b",
        ),
        (
            "a pool name that climbs the path",
            post.clone(),
            "/api/v1/sessions".into(),
            &alice,
            Some(json!({ "pool": "../../secrets" })),
            400,
            "is not an RFC 1123",
        ),
        (
            "a namespace with slashes",
            post.clone(),
            "/api/v1/sessions".into(),
            &alice,
            Some(json!({ "pool": "edge", "namespace": "kube-system/secrets/" })),
            400,
            "is not an RFC 1123",
        ),
        (
            "an encoded namespace on a read",
            get.clone(),
            "/api/v1/sessions/x?namespace=kube-system%2Fsecrets%2F".into(),
            &alice,
            None,
            400,
            "is not an RFC 1123",
        ),
        (
            "an encoded name on a read",
            get.clone(),
            "/api/v1/sessions/..%2F..%2Fsecrets".into(),
            &alice,
            None,
            400,
            "is not an RFC 1123",
        ),
        (
            "a namespace the operator does not serve",
            post.clone(),
            "/api/v1/sessions".into(),
            &alice,
            Some(json!({ "pool": "edge", "namespace": "kube-system" })),
            403,
            "not one this operator serves",
        ),
        (
            "a TTL over the pool's cap",
            post.clone(),
            "/api/v1/sessions".into(),
            &alice,
            Some(json!({ "pool": "edge", "ttlSeconds": 3600 })),
            422,
            "maxSessionTTLSeconds",
        ),
    ];
    for (what, method, path, token, body, code, says) in cases {
        let (got, answer, _) = http.send(method, &path, token, body).await;
        assert_eq!(got, code, "{what}: {answer}");
        let message = answer["error"].as_str().unwrap_or_default();
        assert!(message.contains(says), "{what}: {answer}");
        assert!(!message.contains("tidepool-operator") && !message.contains("cannot "), "{what} leaks: {message}");
    }

    // One caller holds at most --sessions-per-caller live sessions.
    let (code, second) = http.create(&alice, json!({ "pool": "edge" })).await;
    assert_eq!(code, 201, "{second}");
    let (code, third, retry) =
        http.send(post.clone(), "/api/v1/sessions", &alice, Some(json!({ "pool": "edge" }))).await;
    assert_eq!(code, 429, "{third}");
    assert!(third["error"].as_str().unwrap().contains("holds 2 live sessions"), "{third}");
    assert!(retry.is_some(), "a 429 says when to retry");
    let (code, _, _) = http.send(reqwest::Method::DELETE, &format!("/api/v1/sessions/{name}"), &alice, None).await;
    assert_eq!(code, 204);
    let freed = Instant::now();
    loop {
        let (code, body) = http.create(&alice, json!({ "pool": "edge" })).await;
        if code == 201 {
            break;
        }
        assert!(code == 429 && freed.elapsed() < Duration::from_secs(10), "{code}: {body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Nothing refused made a session: alice's two live ones, and only those.
    let all = sessions.list(&ListParams::default()).await.unwrap().items;
    assert_eq!(all.len(), 2, "{:?}", all.iter().map(|s| s.metadata.name.clone()).collect::<Vec<_>>());

    let metrics = reqwest::get(format!("{}/metrics", operator.url)).await.unwrap().text().await.unwrap();
    for (route, reason) in [
        ("create", "forbidden"),
        ("create", "bad_token"),
        ("create", "bad_name"),
        ("create", "other_namespace"),
        ("create", "ttl_over_cap"),
        ("create", "caller_limit"),
        ("session", "bad_name"),
    ] {
        let series = format!("tidepool_api_refusals_total{{reason=\"{reason}\",route=\"{route}\"}}");
        assert!(metric(&metrics, &series) >= 1.0, "{series} not counted");
    }

    // A burst of creates from one caller, all at once, before the cache
    // shows any of them: exactly the cap gets through.
    let dave = plane.service_account_token("default", "dave", AUDIENCE, None).await.unwrap();
    grant(client, "default", "dave", &["create", "get"]).await;
    let burst = (0..8).map(|_| http.create(&dave, json!({ "pool": "edge", "ttlSeconds": 60 })));
    let codes: Vec<u16> = futures::future::join_all(burst).await.into_iter().map(|(code, _)| code).collect();
    let through = codes.iter().filter(|&&code| code != 429).count();
    assert_eq!(through, 2, "{codes:?}");
    assert!(codes.iter().all(|&code| matches!(code, 201 | 504 | 429)), "{codes:?}");
    let all = sessions.list(&ListParams::default()).await.unwrap().items;
    let daves =
        all.iter().filter(|s| s.annotations().get("tidepool.dev/created-by").is_some_and(|c| c.ends_with(":dave")));
    assert_eq!(daves.count(), 2, "the burst made more sessions than the cap");

    // The cluster view: a caller who may list sessions and read backends
    // sees it; the tubes are in it only for one who may also list Tubes.
    let tubes: Api<tidepool_crds::Tube> = Api::namespaced(client.clone(), "default");
    let tube: tidepool_crds::Tube = serde_json::from_value(json!({
        "apiVersion": "tidepool.dev/v1alpha1", "kind": "Tube", "metadata": { "name": "seen-tube" },
        "spec": { "pool": "edge", "conversationType": "socks5", "offer": "dj0wDQo=" }
    }))
    .unwrap();
    tubes.create(&PostParams::default(), &tube).await.unwrap();
    for (account, may_list_tubes) in [("erin", false), ("frank", true)] {
        let token = plane.service_account_token("default", account, AUDIENCE, None).await.unwrap();
        let mut resources = vec!["testsessions"];
        if may_list_tubes {
            resources.push("tubes");
        }
        watch_cluster(client, account, &resources).await;
        let view = first_view(&http, &token).await;
        assert!(view["sessions"].as_array().is_some_and(|s| !s.is_empty()), "{account}: {view}");
        if may_list_tubes {
            let listed = view["tubes"].as_array().unwrap_or_else(|| panic!("{account}: no tubes in {view}"));
            assert!(listed.iter().any(|t| t["name"] == "seen-tube"), "{account}: {view}");
        } else {
            assert!(view.get("tubes").is_none(), "{account} may not list tubes: {view}");
        }
    }
}

/// Grants ServiceAccount `default/<account>` what watching the cluster view
/// takes (`list` on `resources` in `default`, `get` on Backends).
async fn watch_cluster(client: &kube::Client, account: &str, resources: &[&str]) {
    let name = format!("{account}-cluster-view");
    bind_role(client, "default", &name, account, vec![rule("tidepool.dev", resources, &["list"])]).await;
    let backends = ClusterRole {
        metadata: ObjectMeta { name: Some(name.clone()), ..Default::default() },
        rules: Some(vec![rule("tidepool.dev", &["backends"], &["get"])]),
        ..Default::default()
    };
    Api::<ClusterRole>::all(client.clone()).create(&PostParams::default(), &backends).await.unwrap();
    let cluster_binding = ClusterRoleBinding {
        metadata: ObjectMeta { name: Some(name.clone()), ..Default::default() },
        role_ref: RoleRef { api_group: "rbac.authorization.k8s.io".into(), kind: "ClusterRole".into(), name },
        subjects: Some(vec![subject(account)]),
    };
    Api::<ClusterRoleBinding>::all(client.clone()).create(&PostParams::default(), &cluster_binding).await.unwrap();
}

/// The first view the cluster stream sends `token`'s holder.
async fn first_view(http: &Http, token: &str) -> Value {
    let url = format!("{}/api/v1/cluster?namespace=default", http.base);
    let mut response = http.client.get(url).bearer_auth(token).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let mut text = String::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !text.contains("\n\n") && Instant::now() < deadline {
        let chunk = tokio::time::timeout(Duration::from_secs(10), response.chunk()).await.unwrap().unwrap();
        text.push_str(&String::from_utf8_lossy(&chunk.expect("the stream ended")));
    }
    let data = text.lines().find_map(|line| line.strip_prefix("data: ")).expect("a cluster event");
    serde_json::from_str(data).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_servers_refusals_do_not_reach_callers() {
    let cluster = Cluster::start(1).await;
    // The pool need not fill: the create fails before any binding.
    cluster.pool("edge", 1).await;
    // An operator whose own rights fall short: it may read and review, but
    // not create TestSessions.
    let client = &cluster.client;
    let narrow = ClusterRole {
        metadata: ObjectMeta { name: Some("narrow-operator".into()), ..Default::default() },
        rules: Some(vec![
            rule("tidepool.dev", &["warmpools", "testsessions", "backends"], &["get", "list", "watch"]),
            rule("", &["nodes", "pods", "secrets"], &["get", "list", "watch"]),
            rule("authentication.k8s.io", &["tokenreviews"], &["create"]),
            rule("authorization.k8s.io", &["subjectaccessreviews"], &["create"]),
            rule("coordination.k8s.io", &["leases"], &["get", "create", "update"]),
        ]),
        ..Default::default()
    };
    Api::<ClusterRole>::all(client.clone()).create(&PostParams::default(), &narrow).await.unwrap();
    let binding = ClusterRoleBinding {
        metadata: ObjectMeta { name: Some("narrow-operator".into()), ..Default::default() },
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "ClusterRole".into(),
            name: "narrow-operator".into(),
        },
        subjects: Some(vec![subject("narrow")]),
    };
    Api::<ClusterRoleBinding>::all(client.clone()).create(&PostParams::default(), &binding).await.unwrap();
    let kubeconfig = cluster.plane.service_account_kubeconfig("default", "narrow").await.unwrap();
    let operator = cluster.operator_with_kubeconfig("narrow", &kubeconfig, &["--no-agent-daemonset"]).await;
    let http = Http { base: operator.url.clone(), client: reqwest::Client::new() };
    let (code, answer) = http.create(TOKEN, json!({ "pool": "edge" })).await;
    assert_eq!(code, 502, "{answer}");
    let message = answer["error"].as_str().unwrap();
    assert_eq!(message, "creating the session: the operator may not do this");
    // The detail is in the operator's log, for its admin.
    let log = operator.process.log_tail(100);
    assert!(log.contains("check its RBAC") && log.contains("narrow"), "{log}");
}

/// The requests `user` made of `resources` after `since`, from the audit log.
fn requests_by(
    audit_log: &std::path::Path,
    user: &str,
    resources: &[&str],
    since: k8s_openapi::jiff::Timestamp,
) -> Vec<String> {
    let text = std::fs::read_to_string(audit_log).unwrap_or_default();
    text.lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|event| event["user"]["username"] == user)
        .filter(|event| resources.contains(&event["objectRef"]["resource"].as_str().unwrap_or_default()))
        .filter(|event| {
            event["requestReceivedTimestamp"]
                .as_str()
                .and_then(|t| t.parse::<k8s_openapi::jiff::Timestamp>().ok())
                .is_some_and(|t| t >= since)
        })
        .map(|event| format!("{} {}", event["verb"], event["requestURI"]))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_credentials_cost_the_api_server_nothing_and_all_look_alike() {
    use tidepool_wire::token::{PoolPublicKey, PoolSigningKey};

    let cluster = Cluster::start_audited(1).await;
    let server = cluster.plane.server().to_string();
    let as_a = cluster.plane.admin_kubeconfig_as("replica-a", &server).unwrap();
    let as_b = cluster.plane.admin_kubeconfig_as("replica-b", &server).unwrap();
    let a = cluster.operator_with_kubeconfig("replica-a", &as_a, &[]).await;
    cluster.pool("edge", 1).await;
    cluster.wait_warm("edge", 1, Duration::from_secs(60)).await;
    // B follows: it serves the results route from its caches.
    let b = cluster.operator_with_kubeconfig("replica-b", &as_b, &[]).await;
    let (code, session) = common::post_session(&a, json!({ "pool": "edge" })).await;
    assert_eq!(code, 201, "{session}");
    let (name, token, ticket) = (
        session["name"].as_str().unwrap().to_string(),
        session["token"].as_str().unwrap().to_string(),
        session["binding"].as_str().unwrap().to_string(),
    );
    // Let B's caches catch up with the session and the pool's key.
    let url = format!("{}/api/v1/sessions/{name}/results", b.url);
    let post = |token: String, ticket: String| {
        let request = reqwest::Client::new()
            .post(&url)
            .bearer_auth(token)
            .header("x-tidepool-binding", ticket)
            .json(&json!({ "results": {}, "final": false }));
        async move {
            let response = request.send().await.unwrap();
            (response.status().as_u16(), response.text().await.unwrap())
        }
    };
    let (code, text) = post(token.clone(), ticket.clone()).await;
    assert_eq!(code, 200, "the real credentials are taken: {text}");
    tokio::time::sleep(Duration::from_millis(500)).await;

    let since = k8s_openapi::jiff::Timestamp::now();
    let mut claims = PoolPublicKey::unverified_claims(&token).unwrap();
    let stranger = PoolSigningKey::generate().unwrap();
    let signed_by_stranger = stranger.sign_session(&claims);
    claims.name = "no-such-session".into();
    let for_no_session = stranger.sign_session(&claims);
    let (payload, _) = token.split_once('.').unwrap();
    let garbled = format!("{payload}.{}", "A".repeat(86));
    let forged = [
        ("not a token", "x.y".to_string(), ticket.clone()),
        ("a garbled signature", garbled, ticket.clone()),
        ("another key's signature", signed_by_stranger, ticket.clone()),
        ("a session that does not exist", for_no_session, stranger.sign_binding(&claims.sid, "p")),
    ];
    let mut answers = Vec::new();
    for (what, token, ticket) in forged {
        let answer = post(token, ticket).await;
        assert_eq!(answer.0, 403, "{what}: {}", answer.1);
        answers.push(answer);
    }
    assert!(answers.windows(2).all(|pair| pair[0] == pair[1]), "the answers differ: {answers:#?}");
    // Reports with made-up tokens are turned away without a TokenReview.
    for i in 0..20 {
        let response = reqwest::Client::new()
            .post(format!("{}/api/v1/agents/report", a.url))
            .bearer_auth(format!("made-up-token-{i}"))
            .body("{}")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 401);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let log = cluster.plane.audit_log();
    let reads = requests_by(&log, "replica-b", &["testsessions", "secrets", "warmpools"], since);
    assert!(reads.is_empty(), "forged results cost API calls: {reads:#?}");
    let reviews = requests_by(&log, "replica-a", &["tokenreviews"], since);
    assert!(reviews.is_empty(), "made-up agent tokens cost TokenReviews: {reviews:#?}");
    // The test can see such calls: the real credentials once more are
    // written, and the audit log shows the write.
    let (code, _) = post(token, ticket).await;
    assert_eq!(code, 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let writes = requests_by(&log, "replica-b", &["testsessions"], since);
    assert!(!writes.is_empty(), "the audit log shows no write by replica-b at all");
}
