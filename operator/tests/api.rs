//! Bad requests to the HTTP API get a 4xx with a JSON error and change nothing.

mod common;

use common::{Cluster, TOKEN};
use kube::api::{Api, ListParams, Patch, PatchParams};
use serde_json::Value;
use tidepool_crds::TestSession;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_unauthorised_or_oversized_requests_are_refused_and_change_nothing() {
    let cluster = Cluster::start(1).await;
    let operator = cluster.operator("operator-0", &["--ready-deadline-seconds=1"]).await;
    cluster.pool("edge", 0).await;
    let http = reqwest::Client::new();
    let url = format!("{}/api/v1/sessions", operator.url);
    let post = |token: Option<&'static str>, body: Vec<u8>| {
        let mut request = http.post(&url).header("content-type", "application/json").body(body);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send()
    };
    // (what, bearer token, body, expected status, expected words in the error)
    type Case = (&'static str, Option<&'static str>, Vec<u8>, u16, &'static str);
    let cases: Vec<Case> = vec![
        ("no token", None, br#"{"pool":"edge"}"#.to_vec(), 401, "a bearer token is required"),
        ("wrong token", Some("nope"), br#"{"pool":"edge"}"#.to_vec(), 401, "was not accepted"),
        ("not JSON", Some(TOKEN), b"pool=edge".to_vec(), 400, "invalid request body"),
        ("unknown field", Some(TOKEN), br#"{"pool":"edge","colour":"red"}"#.to_vec(), 422, "unknown field `colour`"),
        ("no pool", Some(TOKEN), br#"{"profile":"latency"}"#.to_vec(), 422, "missing field `pool`"),
        ("oversized", Some(TOKEN), vec![b' '; 64 * 1024], 413, "length limit"),
        ("unknown pool", Some(TOKEN), br#"{"pool":"nowhere"}"#.to_vec(), 404, "no WarmPool default/nowhere"),
        (
            "unknown profile",
            Some(TOKEN),
            br#"{"pool":"edge","profile":"speedy"}"#.to_vec(),
            422,
            "profile: unknown variant",
        ),
        ("zero TTL", Some(TOKEN), br#"{"pool":"edge","ttlSeconds":0}"#.to_vec(), 422, "spec.ttlSeconds"),
    ];
    for (name, token, body, code, needle) in cases {
        let response = post(token, body).await.unwrap();
        assert_eq!(response.status().as_u16(), code, "{name}");
        let json: Value = response.json().await.unwrap_or_else(|e| panic!("{name}: the error is not JSON: {e}"));
        let message = json["error"].as_str().unwrap_or_default();
        assert!(message.contains(needle), "{name}: {json}");
        assert_eq!(json["code"], code, "{name}");
    }
    let sessions: Api<TestSession> = Api::namespaced(cluster.client.clone(), "default");
    assert!(sessions.list(&ListParams::default()).await.unwrap().items.is_empty(), "a refused request made a session");

    // GET and DELETE of an unknown session: 404 with a JSON error.
    for method in [reqwest::Method::GET, reqwest::Method::DELETE] {
        let response = http.request(method.clone(), format!("{url}/ghost")).bearer_auth(TOKEN).send().await.unwrap();
        assert_eq!(response.status().as_u16(), 404, "{method}");
        let json: Value = response.json().await.unwrap();
        assert!(json["error"].as_str().unwrap().contains("no session default/ghost"));
    }

    // A pool that may not grow makes the request wait, then 504 with the
    // reason; the session is kept and gets the next pod once the pool may grow.
    let pools: Api<tidepool_crds::WarmPool> = Api::namespaced(cluster.client.clone(), "default");
    let cap = |max: i32| serde_json::json!({ "spec": { "maxSize": max } });
    pools.patch("edge", &PatchParams::default(), &Patch::Merge(cap(0))).await.unwrap();
    let response = post(Some(TOKEN), br#"{"pool":"edge"}"#.to_vec()).await.unwrap();
    assert_eq!(response.status().as_u16(), 504);
    let json: Value = response.json().await.unwrap();
    assert!(json["error"].as_str().unwrap().contains("no warm pod free"), "{json}");
    let name = json["session"]["name"].as_str().unwrap().to_string();
    let session = sessions.get(&name).await.unwrap();
    let status = session.status.unwrap();
    assert!(status.conditions.iter().any(|c| c.type_ == "Bound" && c.reason == "PoolEmpty"));
    // Once the pool may grow it makes an on-demand pod, and the waiting session gets it.
    pools.patch("edge", &PatchParams::default(), &Patch::Merge(cap(5))).await.unwrap();
    tidepool_tests::eventually(std::time::Duration::from_secs(30), "the waiting session to get a pod", || async {
        let s = sessions.get(&name).await.ok()?;
        (s.status?.phase == tidepool_crds::test_session::Phase::Ready).then_some(())
    })
    .await
    .unwrap();

    // Health and metrics need no token.
    for path in ["/healthz", "/readyz", "/metrics"] {
        let response = http.get(format!("{}{path}", operator.url)).send().await.unwrap();
        assert_eq!(response.status().as_u16(), 200, "{path}");
    }
    let expected = [
        "tidepool_reconciles_total{controller=\"testsession\"}",
        "tidepool_session_create_to_ready_seconds_bucket{le=\"0.001\"}",
        "tidepool_session_binding_api_writes_count",
        "tidepool_pool_pods{namespace=\"default\",pool=\"edge\",state=\"assigned\"} 1",
        // No token, and a token the API server does not accept.
        "tidepool_api_requests_total{code=\"401\",route=\"create\"} 2",
        "tidepool_leader 1",
    ];
    // The pool's gauges follow its next pass, a moment after the binding.
    let metrics_url = format!("{}/metrics", operator.url);
    let found = tidepool_tests::eventually(std::time::Duration::from_secs(10), "the expected series", || async {
        let text = http.get(&metrics_url).send().await.ok()?.text().await.ok()?;
        expected.iter().all(|series| text.contains(series)).then_some(text)
    })
    .await;
    if let Err(e) = found {
        let text = http.get(&metrics_url).send().await.unwrap().text().await.unwrap();
        let missing: Vec<_> = expected.iter().filter(|s| !text.contains(*s)).collect();
        panic!("{e}: missing {missing:?} in\n{text}");
    }
}
