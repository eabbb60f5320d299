//! The operator's share of the catalogue of bad inputs (docs/security.md):
//! every one is answered with a clear error, changes nothing, and is counted
//! in a metric by reason. The session pod's share (probe requests,
//! WebSocket frames, UDP datagrams) is in session-pod/tests.

mod common;

use std::time::Duration;

use common::{Cluster, TOKEN, post_session};
use kube::api::{Api, ListParams};
use serde_json::{Value, json};
use tidepool_crds::{Backend, TestSession};

/// One bad input: what it is, where it goes, and what must come back.
struct Bad {
    what: &'static str,
    path: String,
    token: Option<String>,
    ticket: Option<String>,
    body: Vec<u8>,
    code: u16,
    /// Words the error must carry.
    says: &'static str,
    /// The metric series that must count it.
    counted: String,
}

fn json_bytes(value: Value) -> Vec<u8> {
    serde_json::to_vec(&value).unwrap()
}

fn refusal(route: &str, reason: &str) -> String {
    format!("tidepool_api_refusals_total{{reason=\"{reason}\",route=\"{route}\"}}")
}

fn report_refusal(reason: &str) -> String {
    format!("tidepool_agent_reports_total{{result=\"{reason}\"}}")
}

fn metric(text: &str, series: &str) -> f64 {
    text.lines().find_map(|l| l.strip_prefix(series).map(|v| v.trim().parse().unwrap_or(0.0))).unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_input_is_answered_counted_and_changes_nothing() {
    let cluster = Cluster::start(1).await;
    let operator = cluster.operator("operator-0", &["--namespaces=default"]).await;
    cluster.pool("edge", 2).await;
    cluster.wait_warm("edge", 2, Duration::from_secs(60)).await;
    let (code, session) = post_session(&operator, json!({ "pool": "edge" })).await;
    assert_eq!(code, 201, "{session}");
    let name = session["name"].as_str().unwrap().to_string();
    let token = session["token"].as_str().unwrap().to_string();
    let ticket = session["binding"].as_str().unwrap().to_string();
    let agent = cluster.plane.service_account_token("default", "tidepool-agent", "tidepool", None).await.unwrap();

    let create = |what, body: Vec<u8>, code, says, reason: &str| Bad {
        what,
        path: "/api/v1/sessions".into(),
        token: Some(TOKEN.into()),
        ticket: None,
        body,
        code,
        says,
        counted: refusal("create", reason),
    };
    let results = |what, token: &str, ticket: &str, body: Vec<u8>, code, says, reason: &str| Bad {
        what,
        path: format!("/api/v1/sessions/{name}/results"),
        token: Some(token.into()),
        ticket: Some(ticket.into()),
        body,
        code,
        says,
        counted: refusal("results", reason),
    };
    let report = |what, token: &str, body: Vec<u8>, code, says, reason: &str| Bad {
        what,
        path: "/api/v1/agents/report".into(),
        token: Some(token.into()),
        ticket: None,
        body,
        code,
        says,
        counted: report_refusal(reason),
    };
    let route = |what, body: Vec<u8>, code, says, reason: &str| Bad {
        what,
        path: "/api/v1/route".into(),
        token: Some(TOKEN.into()),
        ticket: None,
        body,
        code,
        says,
        counted: refusal("route", reason),
    };
    let tube = |what, body: Vec<u8>, code, says, reason: &str| Bad {
        what,
        path: "/api/v1/tubes".into(),
        token: Some(TOKEN.into()),
        ticket: None,
        body,
        code,
        says,
        counted: refusal("tube", reason),
    };
    let offer = |pool: &str, sdp: &[u8]| {
        use base64::Engine as _;
        let offer = base64::engine::general_purpose::STANDARD.encode(sdp);
        json_bytes(json!({ "pool": pool, "conversationType": "socks5", "offer": offer }))
    };
    let pool = |fields: Value| {
        let mut body = json!({ "pool": "edge" });
        body.as_object_mut().unwrap().extend(fields.as_object().unwrap().clone());
        json_bytes(body)
    };
    let figures = |latency: Value| json_bytes(json!({ "results": { "latency": latency }, "final": false }));
    let external = |backend: &str| {
        json_bytes(json!({
            "backend": backend, "kind": "external", "address": "203.0.113.5:443", "intervalMs": 1000, "seq": 1,
            "sampledAtMs": 1, "capacity": { "cores": 2, "memoryBytes": 1024, "diskBytes": 0, "gpus": [] },
            "windows": [{ "seconds": 10, "samples": 1, "cores": [1.0, 1.0], "memoryUsedBytes": 1, "diskUsedBytes": 0,
                          "netRxBytesPerSecond": 0.0, "netTxBytesPerSecond": 0.0 }]
        }))
    };
    let cases = vec![
        // Sessions.
        Bad { token: None, ..create("no token", pool(json!({})), 401, "bearer token is required", "no_token") },
        Bad {
            token: Some("x".repeat(40)),
            ..create("a token that is no JWT", pool(json!({})), 401, "not accepted", "bad_token")
        },
        create("a body that is not JSON", b"pool=edge".to_vec(), 400, "invalid JSON", "not_json"),
        create("trailing bytes after the JSON", b"{\"pool\":\"edge\"} x".to_vec(), 400, "invalid JSON", "not_json"),
        create("an unknown field", pool(json!({ "colour": "red" })), 422, "unknown field `colour`", "bad_field"),
        create("no pool", json_bytes(json!({ "profile": "latency" })), 422, "missing field `pool`", "bad_field"),
        create("a pool that is a number", json_bytes(json!({ "pool": 7 })), 422, "pool: invalid type", "bad_field"),
        create(
            "an unknown profile",
            pool(json!({ "profile": "speedy" })),
            422,
            "profile: unknown variant",
            "bad_field",
        ),
        create("a negative TTL", pool(json!({ "ttlSeconds": -5 })), 422, "spec.ttlSeconds", "invalid"),
        create(
            "a TTL over the pool's cap",
            pool(json!({ "ttlSeconds": 86_400 })),
            422,
            "maxSessionTTLSeconds",
            "ttl_over_cap",
        ),
        create(
            "a pool name with a path in it",
            json_bytes(json!({ "pool": "../../secrets" })),
            400,
            "RFC 1123",
            "bad_name",
        ),
        create(
            "a namespace with a path in it",
            pool(json!({ "namespace": "kube-system/secrets" })),
            400,
            "RFC 1123",
            "bad_name",
        ),
        create(
            "a namespace the operator does not serve",
            pool(json!({ "namespace": "kube-system" })),
            403,
            "not one this operator serves",
            "other_namespace",
        ),
        create(
            "a pool that does not exist",
            json_bytes(json!({ "pool": "nowhere" })),
            404,
            "no WarmPool default/nowhere",
            "no_pool",
        ),
        create(
            "a client address that is no address",
            pool(json!({ "client": { "address": "not-an-ip" } })),
            422,
            "client.address",
            "invalid",
        ),
        create("a sticky key of odd characters", pool(json!({ "stickyKey": "a b/c" })), 422, "stickyKey", "invalid"),
        create(
            "33 probe targets",
            pool(json!({ "probes": vec![json!({ "type": "dns", "host": "example.org" }); 33] })),
            422,
            "spec.probes",
            "invalid",
        ),
        create("an oversized body", vec![b' '; 64 * 1024], 413, "length limit", "too_large"),
        // Tubes.
        tube("an oversized offer", vec![b' '; 100 * 1024], 413, "length limit", "too_large"),
        tube("an offer over 48 KiB of SDP", offer("edge", &[b'a'; 50 * 1024]), 400, "at most 49152", "bad_offer"),
        tube("a tube on a pool that does not exist", offer("nowhere", b"v=0\r\n"), 404, "no WarmPool", "no_pool"),
        tube("a tube on a pool that allows none", offer("edge", b"v=0\r\n"), 422, "allows tubes nowhere", "refused"),
        // Routing.
        route(
            "a tier with no CPU",
            json_bytes(json!({ "tier": { "vcpu": 0, "memoryMiB": 64 } })),
            422,
            "tier.vcpu",
            "bad_field",
        ),
        route(
            "a client address that is no address",
            json_bytes(json!({ "tier": { "vcpu": 1, "memoryMiB": 64 }, "clientAddress": "x" })),
            422,
            "clientAddress",
            "bad_field",
        ),
        route(
            "weights out of range",
            json_bytes(json!({ "tier": { "vcpu": 1, "memoryMiB": 64 }, "weights": { "cpu": 1e9 } })),
            422,
            "weights",
            "bad_field",
        ),
        // Results.
        results(
            "results without credentials",
            "",
            "",
            figures(json!({})),
            401,
            "need the session token",
            "no_credentials",
        ),
        results(
            "a made-up results token",
            "a.b",
            &ticket,
            figures(json!({})),
            403,
            "not for this session",
            "bad_credentials",
        ),
        results(
            "another pod's ticket",
            &token,
            "AAAAAAAAAAAA.AAAA",
            figures(json!({})),
            403,
            "not for this session",
            "bad_credentials",
        ),
        results("results that are not JSON", &token, &ticket, b"latency=1".to_vec(), 400, "invalid JSON", "not_json"),
        results(
            "a negative latency",
            &token,
            &ticket,
            figures(
                json!({ "p50Ms": -1.0, "p95Ms": 1.0, "p99Ms": 1.0, "jitterMs": 0.0, "lossPercent": 0.0, "samples": 1 }),
            ),
            422,
            "results.latency.p50Ms",
            "bad_field",
        ),
        results(
            "a loss over 100 %",
            &token,
            &ticket,
            figures(
                json!({ "p50Ms": 1.0, "p95Ms": 1.0, "p99Ms": 1.0, "jitterMs": 0.0, "lossPercent": 101.0, "samples": 1 }),
            ),
            422,
            "lossPercent",
            "bad_field",
        ),
        results(
            "NaN as JSON null",
            &token,
            &ticket,
            figures(json!({ "p50Ms": null })),
            422,
            "results.latency.p50Ms",
            "bad_field",
        ),
        results("an oversized report", &token, &ticket, vec![b' '; 300 * 1024], 413, "length limit", "too_large"),
        // Agent reports.
        Bad {
            token: None,
            ..report("a report with no token", "", external("ext"), 401, "bearer token", "unauthenticated")
        },
        report("a report with a made-up token", "made-up", external("ext"), 401, "not accepted", "unauthenticated"),
        report(
            "a report for an unregistered backend",
            &agent,
            external("rogue"),
            403,
            "no Backend rogue",
            "unregistered",
        ),
        report("a report for a node's name", &agent, external("node-0"), 409, "a node's name", "wrong_node"),
        report("a report that is not JSON", &agent, b"{\"backend\":".to_vec(), 400, "invalid JSON", "malformed"),
        report(
            "a report with an unknown field",
            &agent,
            json_bytes(json!({ "backend": "ext", "extra": 1 })),
            400,
            "unknown field",
            "malformed",
        ),
        report("an oversized report", &agent, vec![b' '; 300 * 1024], 413, "length limit", "too_large"),
    ];
    assert!(cases.len() >= 36, "the catalogue shrank");

    let sessions: Api<TestSession> = Api::namespaced(cluster.client.clone(), "default");
    let before = sessions.get(&name).await.unwrap();
    let metrics_url = format!("{}/metrics", operator.url);
    let http = reqwest::Client::new();
    for case in cases {
        let counted_before = metric(&http.get(&metrics_url).send().await.unwrap().text().await.unwrap(), &case.counted);
        let mut request = http
            .post(format!("{}{}", operator.url, case.path))
            .header("content-type", "application/json")
            .body(case.body);
        if let Some(token) = case.token.filter(|t| !t.is_empty()) {
            request = request.bearer_auth(token);
        }
        if let Some(ticket) = case.ticket.filter(|t| !t.is_empty()) {
            request = request.header("x-tidepool-binding", ticket);
        }
        let response = request.send().await.unwrap();
        let code = response.status().as_u16();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        assert_eq!(code, case.code, "{}: {body}", case.what);
        let message = body["error"].as_str().unwrap_or_default();
        assert!(message.contains(case.says), "{}: {body}", case.what);
        let counted_after = metric(&http.get(&metrics_url).send().await.unwrap().text().await.unwrap(), &case.counted);
        assert_eq!(counted_after, counted_before + 1.0, "{}: {} not counted", case.what, case.counted);
    }

    // Nothing changed: one session (with no results), no Backend.
    let all = sessions.list(&ListParams::default()).await.unwrap().items;
    assert_eq!(all.len(), 1, "a refused request made a session");
    let after = sessions.get(&name).await.unwrap();
    assert_eq!(after.status.as_ref().and_then(|s| s.results.clone()), None, "a refused report wrote results");
    assert_eq!(after.status.map(|s| s.pod), before.status.map(|s| s.pod));
    let tubes: Api<tidepool_crds::Tube> = Api::all(cluster.client.clone());
    assert!(tubes.list(&ListParams::default()).await.unwrap().items.is_empty(), "a refused request made a Tube");
    let backends: Api<Backend> = Api::all(cluster.client.clone());
    assert!(backends.list(&ListParams::default()).await.unwrap().items.is_empty(), "a refused report made a Backend");
}
