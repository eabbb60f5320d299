//! Results kept in object storage, against a real S3 server (SeaweedFS):
//! the store client's calls and signatures; ended sessions stored once each,
//! kept until they are stored while the store is down, and stored when it
//! comes back; reading them back through the API and the CLI.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{Cluster, TOKEN, post_session};
use kube::api::{Api, PostParams};
use serde_json::{Value, json};
use tidepool_crds::TestSession;
use tidepool_crds::test_session::{Grade, Phase};
use tidepool_operator::export::s3::{S3Config, S3Error, S3Store};
use tidepool_protocol::stored::{ResultsPage, StoredResult};
use tidepool_tests::s3::{ACCESS_KEY_ID, S3Server, SECRET_ACCESS_KEY};
use tidepool_tests::{eventually, workspace_binary};

const BUCKET: &str = "tidepool-results";

fn store(server: &S3Server, secret: &str) -> S3Store {
    S3Store::new(S3Config {
        endpoint: server.endpoint().parse().unwrap(),
        bucket: server.bucket.clone(),
        region: "us-east-1".into(),
        access_key_id: ACCESS_KEY_ID.into(),
        secret_access_key: secret.into(),
        virtual_hosted: false,
    })
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_client_speaks_s3_to_a_real_server() {
    let server = S3Server::start(BUCKET).await.unwrap();
    let s3 = store(&server, SECRET_ACCESS_KEY).with_page_size(2);
    for name in ["a", "b", "c", "d", "e"] {
        s3.put(&format!("t/ns/pool-1/2026-12-05/{name}.json"), name.as_bytes().to_vec(), "application/json")
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", server.log_tail(30)));
    }
    s3.put("t/ns/pool-2/2026-12-05/odd key+&=.json", b"{}".to_vec(), "application/json").await.unwrap();
    // A repeat overwrites: one object, the newer body.
    s3.put("t/ns/pool-1/2026-12-05/a.json", b"A".to_vec(), "application/json").await.unwrap();
    assert_eq!(s3.get("t/ns/pool-1/2026-12-05/a.json").await.unwrap().as_deref(), Some(&b"A"[..]));
    assert_eq!(s3.get("t/ns/pool-1/2026-12-05/none.json").await.unwrap(), None);

    // Pages of two, followed to the end.
    let mut keys = Vec::new();
    let mut token = None;
    let mut pages = 0;
    loop {
        let page = s3.list("t/ns/pool-1/", None, token.as_deref()).await.unwrap();
        keys.extend(page.keys);
        pages += 1;
        token = page.next_token;
        if token.is_none() {
            break;
        }
    }
    assert_eq!(keys.len(), 5, "{keys:?}");
    assert!(pages >= 3, "{pages} pages");
    let folders = store(&server, SECRET_ACCESS_KEY).list("t/ns/", Some("/"), None).await.unwrap();
    assert_eq!(folders.common_prefixes, ["t/ns/pool-1/", "t/ns/pool-2/"]);
    let odd = store(&server, SECRET_ACCESS_KEY).list("t/ns/pool-2/", None, None).await.unwrap();
    assert_eq!(odd.keys, ["t/ns/pool-2/2026-12-05/odd key+&=.json"]);

    // The server checks our signatures: a wrong secret is refused.
    let wrong = store(&server, "not-the-secret-key-at-all-0123456789");
    match wrong.put("t/x.json", b"{}".to_vec(), "application/json").await {
        Err(S3Error::Status { status, code }) => {
            assert_eq!(status.as_u16(), 403, "{code:?}");
            assert_eq!(code.as_deref(), Some("SignatureDoesNotMatch"));
        }
        other => panic!("a wrong secret was not refused: {other:?}"),
    }
    assert_eq!(store(&server, SECRET_ACCESS_KEY).get("t/x.json").await.unwrap(), None);
}

/// A query stops at its listing budget and says so; one within it reads everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_results_query_stops_at_its_listing_budget() {
    use tidepool_operator::export::{Exporter, history};
    use tidepool_protocol::stored::ResultsQuery;
    let server = S3Server::start(BUCKET).await.unwrap();
    let now = k8s_openapi::jiff::Timestamp::now();
    let day = now.to_zoned(k8s_openapi::jiff::tz::TimeZone::UTC).date();
    let s3 = store(&server, SECRET_ACCESS_KEY);
    let count = history::MAX_LISTS + 5;
    for i in 0..count {
        let document = json!({
            "apiVersion": "tidepool.dev/v1alpha1", "kind": "TestSessionResult", "namespace": "ns",
            "name": format!("s-{i:03}"), "uid": "u", "pool": "edge", "profile": "latency", "phase": "Completed",
            "endedAt": now.to_string(),
        });
        let key = format!("tidepool/ns/edge/{day}/s-{i:03}-u.json");
        s3.put(&key, serde_json::to_vec(&document).unwrap(), "application/json").await.unwrap();
    }
    let metrics = std::sync::Arc::new(tidepool_operator::metrics::Metrics::new().unwrap());
    let query = ResultsQuery { pool: Some("edge".into()), limit: Some(500), ..Default::default() };
    let plan = history::plan(&query, "ns".into(), now + k8s_openapi::jiff::SignedDuration::from_secs(1)).unwrap();
    // One key a page: the budget runs out before the last page.
    let paged = Exporter::new(store(&server, SECRET_ACCESS_KEY).with_page_size(1), "tidepool", metrics.clone());
    let page = history::read(&paged, &plan).await.unwrap();
    assert_eq!((page.items.len(), page.truncated), (history::MAX_LISTS, true));
    // The store's own pages: one call lists them all.
    let whole = Exporter::new(store(&server, SECRET_ACCESS_KEY), "tidepool", metrics);
    let page = history::read(&whole, &plan).await.unwrap();
    assert_eq!((page.items.len(), page.truncated), (count, false));
}

/// Reports final results for a session made through the API: it completes.
async fn complete(operator: &common::Operator, download_mbps: f64, uplift_ms: f64) -> String {
    let (code, body) = post_session(operator, json!({ "pool": "edge", "profile": "bufferbloat" })).await;
    assert_eq!(code, 201, "{body}");
    let name = body["name"].as_str().unwrap().to_string();
    let results = json!({
        "latency": { "p50Ms": 10.0, "p95Ms": 12.0, "p99Ms": 14.0, "jitterMs": 0.5, "lossPercent": 0.0, "samples": 20 },
        "loadedLatency": { "downloadMs": 10.0 + uplift_ms, "uploadMs": 10.0 + uplift_ms },
        "downloadMbps": download_mbps, "uploadMbps": 5.0
    });
    let response = reqwest::Client::new()
        .post(format!("{}/api/v1/sessions/{name}/results", operator.url))
        .bearer_auth(body["token"].as_str().unwrap())
        .header("x-tidepool-binding", body["binding"].as_str().unwrap())
        .json(&json!({ "results": results, "final": true }))
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success(), "{}", response.text().await.unwrap());
    name
}

/// Every object under the prefix, by key.
async fn stored(s3: &S3Store) -> BTreeMap<String, StoredResult> {
    let mut objects = BTreeMap::new();
    let mut token = None;
    loop {
        let page = s3.list("tidepool/", None, token.as_deref()).await.unwrap();
        for key in page.keys {
            let body = s3.get(&key).await.unwrap().unwrap();
            objects.insert(key, serde_json::from_slice(&body).unwrap());
        }
        token = page.next_token;
        if token.is_none() {
            return objects;
        }
    }
}

async fn read_back(operator: &common::Operator, query: &str, token: Option<&str>) -> (u16, Value) {
    let mut request = reqwest::Client::new().get(format!("{}/api/v1/results{query}", operator.url));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.unwrap();
    (response.status().as_u16(), response.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ended_sessions_are_stored_once_and_wait_out_a_store_outage() {
    let mut server = S3Server::start(BUCKET).await.unwrap();
    let cluster = Cluster::start(1).await;
    let endpoint = format!("--results-store-endpoint={}", server.endpoint());
    let args = [
        endpoint.as_str(),
        "--results-store-bucket=tidepool-results",
        "--results-store-access-key-id=tidepool-tests",
        "--results-store-secret-access-key=tidepool-tests-secret-key-0123456789",
        // Deleted a second after ending, once stored: what the store holds is all that is left.
        "--result-retention-seconds=1",
    ];
    let operator = cluster.operator("operator-0", &args).await;
    cluster.pool("edge", 4).await;
    cluster.wait_warm("edge", 4, Duration::from_secs(30)).await;
    let sessions: Api<TestSession> = Api::namespaced(cluster.client.clone(), "default");
    let s3 = store(&server, SECRET_ACCESS_KEY);

    // A session that completes is stored, then deleted when its retention ends.
    let first = complete(&operator, 50.0, 2.0).await;
    eventually(Duration::from_secs(30), "the first session stored and deleted", || async {
        sessions.get_opt(&first).await.unwrap().is_none().then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", operator.process.log_tail(40)));
    let objects = stored(&s3).await;
    assert_eq!(objects.len(), 1, "{objects:?}");
    let (key, document) = objects.iter().next().unwrap();
    assert!(key.starts_with("tidepool/default/edge/") && key.ends_with(&format!("/{first}-{}.json", document.uid)));
    assert_eq!((document.name.as_str(), document.phase), (first.as_str(), Phase::Completed));
    assert_eq!(document.client.created_by.as_deref(), Some("static-token"), "{document:?}");
    let results = document.results.as_ref().expect("the results are in the document");
    assert_eq!(results.download_mbps, Some(50.0));
    assert!(document.overall_grade().is_some_and(|g| g <= Grade::A), "{document:?}");

    // The store goes down. Sessions that end meanwhile are kept, and say why.
    server.stop();
    let waiting = [complete(&operator, 20.0, 200.0).await, complete(&operator, 30.0, 400.0).await];
    let expiring = {
        let session: TestSession = serde_json::from_value(json!({
            "apiVersion": tidepool_crds::API_VERSION, "kind": "TestSession",
            "metadata": { "name": "short-lived" },
            "spec": { "pool": "edge", "ttlSeconds": 1, "client": { "address": "192.0.2.44" } }
        }))
        .unwrap();
        sessions.create(&PostParams::default(), &session).await.unwrap().metadata.name.unwrap()
    };
    let all_waiting: Vec<String> = waiting.iter().cloned().chain([expiring.clone()]).collect();
    eventually(Duration::from_secs(30), "each ended session to say the store is down", || async {
        for name in &all_waiting {
            let status = sessions.get(name).await.unwrap().status?;
            let said = status.conditions.iter().any(|c| c.type_ == "Exported" && c.reason == "StoreUnavailable");
            if !(status.phase.has_ended() && said && status.exported_at.is_none()) {
                return None;
            }
        }
        Some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", operator.process.log_tail(40)));
    // Well past their retention, none is deleted; the backlog says how many wait.
    let metrics = reqwest::Client::new();
    eventually(Duration::from_secs(30), "the backlog gauge", || async {
        let text = metrics.get(format!("{}/metrics", operator.url)).send().await.ok()?.text().await.ok()?;
        text.lines().any(|l| l == "tidepool_results_export_backlog 3").then_some(())
    })
    .await
    .unwrap();
    for name in &all_waiting {
        assert!(sessions.get_opt(name).await.unwrap().is_some(), "{name} was deleted before it was stored");
    }
    let (code, body) = read_back(&operator, "", Some(TOKEN)).await;
    assert_eq!(code, 503, "{body}");
    assert_eq!(body["error"], "the results store is not answering; try again later");
    let metrics_text = metrics.get(format!("{}/metrics", operator.url)).send().await.unwrap().text().await.unwrap();
    assert!(
        metrics_text.contains(r#"tidepool_api_refusals_total{reason="store_unavailable",route="stored_results"} 1"#),
        "{metrics_text}"
    );

    // It comes back: every waiting result arrives, once, and the sessions go.
    server.start_again().await.unwrap();
    eventually(Duration::from_secs(90), "the waiting sessions stored and deleted", || async {
        for name in &all_waiting {
            if sessions.get_opt(name).await.unwrap().is_some() {
                return None;
            }
        }
        Some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", operator.process.log_tail(40)));
    let objects = stored(&s3).await;
    let mut names: Vec<&str> = objects.values().map(|d| d.name.as_str()).collect();
    names.sort();
    let mut expected: Vec<&str> = all_waiting.iter().map(String::as_str).chain([first.as_str()]).collect();
    expected.sort();
    assert_eq!(names, expected, "each ended session stored exactly once");
    let expired = objects.values().find(|d| d.name == expiring).unwrap();
    assert_eq!((expired.phase, expired.client.address.as_deref()), (Phase::Expired, Some("192.0.2.44")));

    // Read back through the API: newest first, filtered, checked.
    let (code, body) = read_back(&operator, "?pool=edge&since=1h", Some(TOKEN)).await;
    assert_eq!(code, 200, "{body}");
    let page: ResultsPage = serde_json::from_value(body).unwrap();
    assert_eq!(page.items.len(), 4);
    assert!(page.items.windows(2).all(|w| w[0].ended_at >= w[1].ended_at), "not newest first");
    let (_, body) = read_back(&operator, "?grade=C,D,F", Some(TOKEN)).await;
    let poor: ResultsPage = serde_json::from_value(body).unwrap();
    let mut poor_names: Vec<&str> = poor.items.iter().map(|d| d.name.as_str()).collect();
    poor_names.sort();
    let mut waiting_sorted: Vec<&str> = waiting.iter().map(String::as_str).collect();
    waiting_sorted.sort();
    assert_eq!(poor_names, waiting_sorted, "the bloated lines grade C or worse");
    let (_, body) = read_back(&operator, "?client=192.0.2.44&limit=1", Some(TOKEN)).await;
    assert_eq!(body["items"][0]["name"], expiring.as_str(), "{body}");
    for (query, token, code, words) in [
        ("", None, 401, ""),
        ("?since=yesterday", Some(TOKEN), 422, "since"),
        ("?since=60d", Some(TOKEN), 422, "31 days"),
        ("?grade=E", Some(TOKEN), 422, "grade"),
        ("?pool=../etc", Some(TOKEN), 400, ""),
        ("?namespace=kube-system", Some(TOKEN), 403, ""),
        ("?colour=red", Some(TOKEN), 400, "unknown field `colour`"),
        ("?limit=many", Some(TOKEN), 400, "limit"),
    ] {
        let (status, body) = read_back(&operator, query, token).await;
        assert_eq!(status, code, "{query}: {body}");
        assert!(body.to_string().contains(words), "{query}: {body}");
    }

    // And through the CLI.
    let cli = workspace_binary("tidepool-cli", "tidepool").unwrap();
    let run = |args: &[&str]| {
        let output = std::process::Command::new(&cli)
            .args(["results", "--operator", &operator.url])
            .args(args)
            .env("TIDEPOOL_API_TOKEN", TOKEN)
            .output()
            .unwrap();
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8(output.stdout).unwrap()
    };
    let table = run(&["--pool", "edge", "--since", "2h"]);
    assert!(table.starts_with("ENDED"), "{table}");
    for name in &expected {
        assert!(table.contains(name), "{name} missing from\n{table}");
    }
    let json: ResultsPage = serde_json::from_str(&run(&["--grade", "A+,A", "--json"])).unwrap();
    assert_eq!(json.items.iter().map(|d| d.name.as_str()).collect::<Vec<_>>(), [first.as_str()]);
}
