//! `POST /api/v1/probes`: only the targets the session token names, once or
//! every interval; only the addresses the pool's egress policy allows; within
//! the session's bytes and runs a minute.

use reqwest::StatusCode;
use serde_json::json;
use tidepool_crds::test_session::{ProbeKind, ProbeTarget};
use tidepool_protocol::BINDING_HEADER;
use tidepool_protocol::pod::{PROBES_PATH, ProbeResponse, probes_digest};

use crate::support::*;

/// A request with a token whose claims name `targets` as the session's probes.
fn with_targets(pod: &Pod, method: reqwest::Method, path: &str, targets: &[ProbeTarget]) -> reqwest::RequestBuilder {
    let mut claims = claims(SID, unix_now() + 3600);
    claims.probes = probes_digest(targets);
    let (token, ticket) = (pod.key.sign_session(&claims), pod.key.sign_binding(SID, POD));
    pod.http.request(method, pod.url(path)).bearer_auth(token).header(BINDING_HEADER, ticket)
}

/// Answers every connection to `listener` with a small HTTP 200 and `body`.
fn answer_http(listener: tokio::net::TcpListener, body: Vec<u8>) {
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut head = [0u8; 1024];
            let _ = stream.read(&mut head).await;
            let answer = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n", body.len());
            let _ = stream.write_all(answer.as_bytes()).await;
            let _ = stream.write_all(&body).await;
        }
    });
}

fn tcp(port: u16) -> ProbeTarget {
    ProbeTarget { kind: ProbeKind::Tcp, url: None, host: Some("127.0.0.1".into()), port: Some(i32::from(port)) }
}

#[tokio::test]
async fn the_sessions_own_targets_are_probed_and_no_others() {
    let pod = start_with(allow_loopback).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let targets = vec![tcp(listener.local_addr().unwrap().port())];
    let body = json!({ "targets": targets });

    let response =
        with_targets(&pod, reqwest::Method::POST, PROBES_PATH, &targets).json_body(&body).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let answer: ProbeResponse = json(response).await;
    assert_eq!(answer.results.len(), 1);
    assert!(answer.results[0].ok, "{:?}", answer.results[0]);
    assert!(answer.results[0].timings.as_ref().unwrap().connect_ms.is_some());

    // Other targets than the token's: refused, whatever they are.
    let other = json!({ "targets": [tcp(9)] });
    let (status, message) = refusal(
        with_targets(&pod, reqwest::Method::POST, PROBES_PATH, &targets).json_body(&other).send().await.unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(message.contains("not this session's spec.probes"), "{message}");

    // A session with no targets may probe nothing (another pod: a pod keeps
    // the claims of the session it first served).
    let plain = start().await;
    let (status, message) = refusal(plain.post(PROBES_PATH).json_body(&body).send().await.unwrap()).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(message.contains("no probe targets"), "{message}");

    // A bad tier or interval: 422 naming it.
    let bad_tier = json!({ "targets": targets, "tier": 4 });
    let (status, message) = refusal(
        with_targets(&pod, reqwest::Method::POST, PROBES_PATH, &targets).json_body(&bad_tier).send().await.unwrap(),
    )
    .await;
    assert_eq!((status, message.contains("tier")), (StatusCode::UNPROCESSABLE_ENTITY, true), "{message}");
    // A client may not start above the tier its token allows (1 here): only
    // the operator raises it.
    let higher = json!({ "targets": targets, "tier": 2 });
    let (status, message) = refusal(
        with_targets(&pod, reqwest::Method::POST, PROBES_PATH, &targets).json_body(&higher).send().await.unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{message}");
    assert!(message.contains("tier 1 at most"), "{message}");
    let path = format!("{PROBES_PATH}?everySeconds=1");
    let (status, message) =
        refusal(with_targets(&pod, reqwest::Method::POST, &path, &targets).json_body(&body).send().await.unwrap())
            .await;
    assert_eq!((status, message.contains("everySeconds")), (StatusCode::UNPROCESSABLE_ENTITY, true), "{message}");
}

#[tokio::test]
async fn continuous_runs_keep_their_results_until_stopped() {
    let pod = start_with(allow_loopback).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let targets = vec![tcp(listener.local_addr().unwrap().port())];
    let path = format!("{PROBES_PATH}?everySeconds=10");
    let body = json!({ "targets": targets });
    let response = with_targets(&pod, reqwest::Method::POST, &path, &targets).json_body(&body).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    // The first run starts at once; its results become the pod's latest.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let latest = loop {
        if let Some(results) = pod.server.latest_results() {
            break results;
        }
        assert!(std::time::Instant::now() < deadline, "no continuous run finished");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(latest.probes.len(), 1);
    assert!(latest.probes[0].ok && !latest.is_final);

    let stop = with_targets(&pod, reqwest::Method::DELETE, PROBES_PATH, &targets).send().await.unwrap();
    assert_eq!(stop.status(), StatusCode::OK);
    let again = with_targets(&pod, reqwest::Method::DELETE, PROBES_PATH, &targets).send().await.unwrap();
    assert_eq!(again.status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn loopback_is_refused_unless_the_pool_allows_it() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let targets = vec![
        tcp(port),
        ProbeTarget { kind: ProbeKind::Http, url: Some(format!("http://localhost:{port}/")), host: None, port: None },
    ];
    let body = json!({ "targets": targets });

    let pod = start().await;
    let answer: ProbeResponse =
        json(with_targets(&pod, reqwest::Method::POST, PROBES_PATH, &targets).json_body(&body).send().await.unwrap())
            .await;
    assert_eq!(answer.results.len(), 2);
    assert!(answer.results.iter().all(|result| !result.ok), "{:?}", answer.results);
    assert_eq!(answer.results[0].error.as_deref(), Some("refused by the pool's egress policy: 127.0.0.1 is loopback"));
    let named = answer.results[1].error.as_deref().unwrap();
    assert!(named.starts_with("refused by the pool's egress policy: localhost resolves to "), "{named}");
    let accepted = tokio::time::timeout(std::time::Duration::from_millis(300), listener.accept()).await;
    assert!(accepted.is_err(), "a refused probe connected");
    answer_http(listener, b"ok".to_vec());
    let refused = r#"tidepool_session_probe_egress_refusals_total{reason="loopback"}"#;
    assert_eq!(metric(&pod, refused).await, 2.0);
    assert_eq!(metric(&pod, r#"tidepool_session_probe_runs_total{mode="once"}"#).await, 1.0);

    // The same targets on a pod whose pool allows loopback, as the operator sets it.
    let open = start_with(|config| {
        config.egress = tidepool_protocol::egress::EgressPolicy::parse(
            &format!(r#"[{{"cidr":"127.0.0.0/8","ports":[{port}]}},{{"host":"localhost"}}]"#),
            "",
        )
        .unwrap()
    })
    .await;
    let answer: ProbeResponse =
        json(with_targets(&open, reqwest::Method::POST, PROBES_PATH, &targets).json_body(&body).send().await.unwrap())
            .await;
    assert!(answer.results.iter().all(|result| result.ok), "{:?}", answer.results);
    assert_eq!(metric(&open, refused).await, 0.0);
}

#[tokio::test]
async fn a_session_that_spent_its_probe_bytes_is_refused_with_429() {
    let pod = start_with(|config| {
        allow_loopback(config);
        config.probe_limits.bytes_per_session = 100;
    })
    .await;
    let server = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = server.local_addr().unwrap().port();
    // A kilobyte to whoever asks: the first run spends the budget.
    answer_http(server, vec![b'x'; 1024]);
    let url = format!("http://127.0.0.1:{port}/");
    let targets = vec![ProbeTarget { kind: ProbeKind::Http, url: Some(url), host: None, port: None }];
    let body = json!({ "targets": targets });
    let first: ProbeResponse =
        json(with_targets(&pod, reqwest::Method::POST, PROBES_PATH, &targets).json_body(&body).send().await.unwrap())
            .await;
    let error = first.results[0].error.as_deref().unwrap_or_default();
    assert!(error.contains("probe traffic cap of 100 bytes is spent"), "{:?}", first.results);
    assert_eq!(metric(&pod, "tidepool_session_probe_bytes_total").await, 100.0);

    let response =
        with_targets(&pod, reqwest::Method::POST, PROBES_PATH, &targets).json_body(&body).send().await.unwrap();
    assert!(response.headers().contains_key("retry-after"));
    let (status, message) = refusal(response).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert!(message.starts_with("limit probe_bytes_per_session: "), "{message}");
    assert_eq!(metric(&pod, r#"tidepool_session_refusals_total{reason="probe_bytes"}"#).await, 1.0);
}

#[tokio::test]
async fn probe_runs_beyond_the_minutes_cap_are_refused_with_429() {
    let pod = start_with(|config| {
        allow_loopback(config);
        config.probe_limits.runs_per_minute = 2;
    })
    .await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let targets = vec![tcp(listener.local_addr().unwrap().port())];
    let body = json!({ "targets": targets });
    let send = || with_targets(&pod, reqwest::Method::POST, PROBES_PATH, &targets).json_body(&body).send();
    for _ in 0..2 {
        let answer: ProbeResponse = json(send().await.unwrap()).await;
        assert!(answer.results[0].ok, "{:?}", answer.results);
    }
    let response = send().await.unwrap();
    let retry_after: u64 = response.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((55..=60).contains(&retry_after), "{retry_after}");
    let (status, message) = refusal(response).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert!(message.starts_with("limit probe_runs_per_minute: 2 probe runs a minute"), "{message}");

    // Continuous runs faster than the cap allows are refused before they start.
    let path = format!("{PROBES_PATH}?everySeconds=10");
    let (status, message) =
        refusal(with_targets(&pod, reqwest::Method::POST, &path, &targets).json_body(&body).send().await.unwrap())
            .await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert!(message.contains("everySeconds=10 would start more than the 2 probe runs a minute"), "{message}");
    let refused = r#"tidepool_session_refusals_total{reason="probe_runs_per_minute"}"#;
    assert_eq!(metric(&pod, refused).await, 2.0);
}
