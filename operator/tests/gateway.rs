//! The front door on the harness: the gateway in front of the operator and
//! the real session pods behind kwok's pods. An anonymous client starts a
//! session on a public pool, reaches its pod only through the gateway (HTTP,
//! a streamed download, the latency WebSocket), keeps the same token when
//! the pod is killed and the session heals onto another, and meets the
//! limits for anonymous clients; identified callers are relayed as they
//! are; hostile requests get clear errors and change nothing.

mod common;

use std::time::Duration;

use common::{Cluster, TOKEN, until_closed};
use futures_util::{SinkExt, StreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use serde_json::{Value, json};
use tidepool_crds::TestSession;
use tidepool_tests::{PodRunner, Process, eventually, free_port, workspace_binary};
use tokio_tungstenite::tungstenite::Message;

/// This file's tests run one at a time. Each starts a cluster; the
/// browser's and the shaped line's latency figures are the browser's own
/// timing, and on two cores a second cluster beside them delayed pongs by
/// hundreds of milliseconds (a 582 ms median through a 350 ms buffer) and
/// moved the grade.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

struct Gateway {
    process: Process,
    url: String,
    admin: String,
}

async fn start_gateway_with(cluster: &Cluster, operator_url: &str, name: &str, extra: &[String]) -> Gateway {
    let (port, admin_port) = (free_port().unwrap(), free_port().unwrap());
    let mut args = vec![
        format!("--listen=127.0.0.1:{port}"),
        format!("--admin-listen=127.0.0.1:{admin_port}"),
        format!("--operator-url={operator_url}"),
        // The static token stands in for the gateway's ServiceAccount token.
        format!("--token-file={}", cluster.token_file().display()),
        "--namespaces=default".into(),
        "--anonymous-sessions-per-hour=3".into(),
        "--anonymous-concurrent-sessions=2".into(),
        "--streams-per-session=4".into(),
    ];
    // A flag in `extra` replaces the default above.
    let flag = |arg: &str| arg.split('=').next().unwrap_or("").to_string();
    args.retain(|arg| !extra.iter().any(|e| flag(e) == flag(arg)));
    args.extend(extra.iter().cloned());
    let program = workspace_binary("tidepool-gateway", "tidepool-gateway").unwrap();
    let process = cluster.plane.spawn(name, &program, &args, &[]).unwrap();
    let admin = format!("http://127.0.0.1:{admin_port}");
    let http = reqwest::Client::new();
    eventually(Duration::from_secs(30), "the gateway's /readyz", || async {
        let r = http.get(format!("{admin}/readyz")).send().await.ok()?;
        r.status().is_success().then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", process.log_tail(40)));
    Gateway { process, url: format!("http://127.0.0.1:{port}"), admin }
}

/// A cluster with the operator, real session pods behind every pool pod,
/// the pools (name, size, spec fields added to the test pool's) warm, and
/// the gateway in front.
struct Stage {
    cluster: Cluster,
    operator: common::Operator,
    gateway: Gateway,
    _runner: PodRunner,
}

async fn stage(operator_extra: &[&str], pools: &[(&str, i32, Value)]) -> Stage {
    stage_with(operator_extra, pools, &[]).await
}

async fn stage_with(operator_extra: &[&str], pools: &[(&str, i32, Value)], gateway_extra: &[String]) -> Stage {
    let cluster = Cluster::start(1).await;
    let port = free_port().unwrap();
    let results_url = format!("--results-url=http://127.0.0.1:{port}");
    let mut args = vec![results_url.as_str(), "--uncapped-callers=static-token"];
    args.extend_from_slice(operator_extra);
    let operator = cluster.operator_on("operator-0", port, &args).await;
    let session_bin = workspace_binary("tidepool-session", "tidepool-session").unwrap();
    let dir = cluster.plane.dir().to_path_buf();
    let runner = PodRunner::start(cluster.client.clone(), "default", "tidepool.dev/pool", session_bin, dir);
    let api: Api<tidepool_crds::WarmPool> = Api::namespaced(cluster.client.clone(), "default");
    for (name, size, spec) in pools {
        cluster.pool(name, *size).await;
        api.patch(name, &PatchParams::default(), &Patch::Merge(json!({ "spec": spec }))).await.unwrap();
    }
    for (name, size, _) in pools {
        cluster.wait_warm(name, *size, Duration::from_secs(30)).await;
    }
    let gateway = start_gateway_with(&cluster, &operator.url, "gateway", gateway_extra).await;
    Stage { cluster, operator, gateway, _runner: runner }
}

async fn post(url: &str, token: Option<&str>, body: Value) -> (u16, Value, Option<String>) {
    let mut request = reqwest::Client::new().post(format!("{url}/api/v1/sessions")).json(&body);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let retry = response.headers().get("retry-after").map(|v| v.to_str().unwrap().to_string());
    (status, response.json().await.unwrap_or(Value::Null), retry)
}

async fn info(endpoint: &str, token: &str) -> (u16, Value) {
    let response =
        reqwest::Client::new().get(format!("{endpoint}/api/v1/info")).bearer_auth(token).send().await.unwrap();
    (response.status().as_u16(), response.json().await.unwrap_or(Value::Null))
}

/// The value of the series `series` (name and labels), which must be exported.
async fn metric(gateway: &Gateway, series: &str) -> f64 {
    let text = reqwest::get(format!("{}/metrics", gateway.admin)).await.unwrap().text().await.unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {series} in:\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_sessions_reach_their_pods_only_through_the_gateway_and_follow_them_when_they_heal() {
    let _alone = ONE_AT_A_TIME.lock().await;
    // One session per caller at the operator: the gateway's own creates
    // must not be held to it, as it makes them for many clients.
    let pools = [("open", 4, json!({ "public": true })), ("closed", 1, json!({}))];
    let Stage { cluster, operator, gateway, _runner } = stage(&["--sessions-per-caller=1"], &pools).await;
    let sessions: Api<TestSession> = Api::namespaced(cluster.client.clone(), "default");

    // A pool not marked public takes no anonymous session, and says nothing of whether it exists.
    let (status, body, _) = post(&gateway.url, None, json!({ "pool": "closed" })).await;
    assert_eq!(status, 401, "{body}");
    let (status, missing, _) = post(&gateway.url, None, json!({ "pool": "nowhere" })).await;
    assert_eq!((status, missing["error"].as_str().map(|e| e.contains("no public pool"))), (401, Some(true)));
    assert!(body["error"].as_str().unwrap().contains("no public pool"), "{body}");

    // An anonymous session on the public pool: made for the address the
    // request came from (not the one the body claims), its endpoint the gateway's.
    let (status, view, _) =
        post(&gateway.url, None, json!({ "pool": "open", "client": { "address": "198.51.100.9" } })).await;
    assert_eq!(status, 201, "{view}\n{}", gateway.process.log_tail(20));
    let endpoint = view["endpoint"].as_str().unwrap().to_string();
    assert_eq!(endpoint, format!("{}/s", gateway.url));
    let token = view["token"].as_str().unwrap().to_string();
    let name = view["name"].as_str().unwrap().to_string();
    let first_pod = view["pod"].as_str().unwrap().to_string();
    let made = sessions.get(&name).await.unwrap();
    assert_eq!(made.spec.client.as_ref().and_then(|c| c.address.as_deref()), Some("127.0.0.1"));

    // HTTP through the gateway reaches the session's pod, without the client holding a binding ticket.
    let (status, pod_info) = info(&endpoint, &token).await;
    assert_eq!((status, pod_info["pod"].as_str()), (200, Some(first_pod.as_str())), "{pod_info}");

    // A download streams through.
    let download =
        reqwest::Client::new().get(format!("{endpoint}/download?seconds=1")).bearer_auth(&token).send().await.unwrap();
    assert_eq!(download.status(), 200);
    let bytes = download.bytes().await.unwrap();
    assert!(bytes.len() > 1 << 20, "a second of download gave {} bytes", bytes.len());

    // The latency WebSocket, with the token in the query as a browser sends it.
    let ws_url = format!("{}/ws?token={token}", endpoint.replacen("http://", "ws://", 1));
    let (mut socket, _) = tokio_tungstenite::connect_async(&ws_url).await.unwrap();
    socket.send(Message::text(json!({ "type": "ping", "seq": 1, "clientTimeUs": 5 }).to_string())).await.unwrap();
    let pong = loop {
        match socket.next().await.unwrap().unwrap() {
            Message::Text(text) => break serde_json::from_str::<Value>(&text).unwrap(),
            _ => continue,
        }
    };
    assert_eq!((pong["type"].as_str(), pong["seq"].as_u64()), (Some("pong"), Some(1)), "{pong}");
    assert_eq!(pong["pod"].as_str(), Some(first_pod.as_str()));
    drop(socket);

    // The session's own token reads the session back through the gateway.
    let read = reqwest::Client::new()
        .get(format!("{}/api/v1/sessions/{name}", gateway.url))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(read.status(), 200);
    let read: Value = read.json().await.unwrap();
    assert_eq!((read["name"].as_str(), read["endpoint"].as_str()), (Some(name.as_str()), Some(endpoint.as_str())));
    // ...but not another session's, and it cannot delete its own.
    let other = reqwest::Client::new()
        .get(format!("{}/api/v1/sessions/someone-else", gateway.url))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), 403);
    let delete = reqwest::Client::new()
        .delete(format!("{}/api/v1/sessions/{name}", gateway.url))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(delete.status(), 403);

    // Kill the pod: the session heals onto another, and the same token
    // reaches the new pod through the gateway.
    let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), "default");
    pods.delete(&first_pod, &DeleteParams::default().grace_period(0)).await.unwrap();
    let healed = eventually(Duration::from_secs(30), "the session to answer from a new pod", || async {
        let (status, pod_info) = info(&endpoint, &token).await;
        let pod = pod_info["pod"].as_str()?.to_string();
        (status == 200 && pod != first_pod).then_some(pod)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", gateway.process.log_tail(30)));
    assert_eq!(sessions.get(&name).await.unwrap().status.unwrap().pod.as_deref(), Some(healed.as_str()));

    // Limits per client address: two live at once...
    let (status, second, _) = post(&gateway.url, None, json!({ "pool": "open" })).await;
    assert_eq!(status, 201, "{second}");
    let (status, refused, retry) = post(&gateway.url, None, json!({ "pool": "open" })).await;
    assert_eq!(status, 429, "{refused}");
    assert!(refused["error"].as_str().unwrap().contains("live sessions"), "{refused}");
    let retry: u64 = retry.expect("Retry-After").parse().unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    // ...and three started an hour: end one, start a third, and the fourth is refused for the hour.
    sessions.delete(second["name"].as_str().unwrap(), &DeleteParams::default()).await.unwrap();
    let (status, third, _) = eventually(Duration::from_secs(10), "a place for a third session", || async {
        let answer = post(&gateway.url, None, json!({ "pool": "open" })).await;
        (answer.0 != 429 || answer.1["error"].as_str()?.contains("last hour")).then_some(answer)
    })
    .await
    .unwrap();
    assert_eq!(status, 201, "{third}");

    // An identified caller goes to the operator as it is (its token, its rights, its limits).
    let (status, identified, _) = post(&gateway.url, Some(TOKEN), json!({ "pool": "closed" })).await;
    assert_eq!(status, 201, "{identified}");
    assert_eq!(identified["endpoint"].as_str(), Some(endpoint.as_str()));
    let (status, _, _) = post(&gateway.url, Some("not-a-token"), json!({ "pool": "closed" })).await;
    assert_eq!(status, 401);

    // Hostile requests: clear errors, and nothing made.
    let before = sessions.list(&Default::default()).await.unwrap().items.len();
    let (status, _, _) = post(&gateway.url, None, json!({ "pool": "open", "namespace": "kube-system" })).await;
    assert_eq!(status, 403);
    let (status, _, _) = post(&gateway.url, None, json!({ "pool": "../secrets" })).await;
    assert_eq!(status, 400);
    let (status, _, _) = post(&gateway.url, None, json!({ "pool": "open", "bogus": 1 })).await;
    assert_eq!(status, 422);
    let http = reqwest::Client::new();
    let big = http.post(format!("{}/api/v1/sessions", gateway.url)).body(vec![b' '; 64 * 1024]).send().await.unwrap();
    assert_eq!(big.status(), 413);
    let (status, _) = info(&endpoint, "garbage").await;
    assert_eq!(status, 401);
    // A token whose claims were changed (another session's name) is not accepted.
    let (payload, signature) = token.split_once('.').unwrap();
    let forged = format!("{payload}x.{signature}");
    let (status, _) = info(&endpoint, &forged).await;
    assert!(status == 401 || status == 403, "{status}");
    let no_token = http.get(format!("{endpoint}/api/v1/info")).send().await.unwrap();
    assert_eq!(no_token.status(), 401);
    let nowhere = http.get(format!("{}/admin", gateway.url)).send().await.unwrap();
    assert_eq!(nowhere.status(), 404);
    assert_eq!(nowhere.headers()["x-content-type-options"], "nosniff");
    assert_eq!(sessions.list(&Default::default()).await.unwrap().items.len(), before);

    // What Prometheus sees.
    assert!(metric(&gateway, "tidepool_gateway_proxied_bytes_total{direction=\"to_client\"}").await > 1e6);
    assert!(metric(&gateway, "tidepool_gateway_refusals_total{reason=\"concurrent_sessions\"}").await >= 1.0);
    assert!(metric(&gateway, "tidepool_gateway_refusals_total{reason=\"not_public\"}").await >= 2.0);
    assert_eq!(metric(&gateway, "tidepool_gateway_anonymous_sessions_total").await, 3.0);
    assert_eq!(metric(&gateway, "tidepool_gateway_open_streams").await, 0.0);

    // A second replica serving TLS from a certificate on disk, with CORS for
    // one origin: the same token reaches the same session through it.
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let (cert, key) = (cluster.plane.dir().join("tls.crt"), cluster.plane.dir().join("tls.key"));
    std::fs::write(&cert, certified.cert.pem()).unwrap();
    std::fs::write(&key, certified.signing_key.serialize_pem()).unwrap();
    let extra = [
        format!("--tls-cert-file={}", cert.display()),
        format!("--tls-key-file={}", key.display()),
        "--cors-origins=https://speed.example.com".to_string(),
    ];
    let secure = start_gateway_with(&cluster, &operator.url, "gateway-tls", &extra).await;
    let port = secure.url.rsplit(':').next().unwrap().to_string();
    let https = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(certified.cert.pem().as_bytes()).unwrap())
        .resolve("localhost", format!("127.0.0.1:{port}").parse().unwrap())
        .build()
        .unwrap();
    let base = format!("https://localhost:{port}");
    let answer = https
        .get(format!("{base}/s/api/v1/info"))
        .bearer_auth(&token)
        .header("origin", "https://speed.example.com")
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    assert_eq!(answer.headers()["strict-transport-security"], "max-age=31536000");
    assert_eq!(answer.headers()["access-control-allow-origin"], "https://speed.example.com");
    assert_eq!(answer.json::<Value>().await.unwrap()["pod"].as_str(), Some(healed.as_str()));
    // Another origin gets no CORS answer, and its preflight is refused.
    let other = https.get(format!("{base}/s/api/v1/info")).bearer_auth(&token).header("origin", "https://evil.test");
    assert!(!other.send().await.unwrap().headers().contains_key("access-control-allow-origin"));
    let preflight = |origin: &str| {
        https
            .request(reqwest::Method::OPTIONS, format!("{base}/api/v1/sessions"))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .send()
    };
    assert_eq!(preflight("https://evil.test").await.unwrap().status(), 403);
    let allowed = preflight("https://speed.example.com").await.unwrap();
    assert_eq!(allowed.status(), 204);
    assert!(allowed.headers()["access-control-allow-headers"].to_str().unwrap().contains("authorization"));
    // Plain HTTP to the TLS port is not served.
    assert!(reqwest::get(format!("http://127.0.0.1:{port}/s/api/v1/info")).await.is_err());
    // Sessions read through it point at its HTTPS address.
    let read: Value = https
        .get(format!("{base}/api/v1/sessions/{name}"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(read["endpoint"].as_str(), Some(format!("{base}/s").as_str()));
}

/// An HTTP/1 request on `stream` and the start of its answer.
fn ask(stream: &mut std::net::TcpStream) -> String {
    use std::io::{Read, Write};
    stream.write_all(b"GET /nothing HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut answer = [0u8; 512];
    let n = stream.read(&mut answer).unwrap();
    String::from_utf8_lossy(&answer[..n]).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateways_listener_cuts_slow_heads_slow_bodies_idle_connections_and_one_too_many() {
    let _alone = ONE_AT_A_TIME.lock().await;
    use std::io::Write;
    use std::net::TcpStream;
    let cluster = Cluster::start(1).await;
    let operator = cluster.operator("operator-0", &[]).await;
    let limits =
        ["--max-connections=3", "--header-timeout-seconds=1", "--body-timeout-seconds=1", "--idle-timeout-seconds=1"]
            .map(String::from);
    let gateway = start_gateway_with(&cluster, &operator.url, "gateway", &limits).await;
    let address = gateway.url.trim_start_matches("http://").to_string();
    let admin = gateway.admin.trim_start_matches("http://").to_string();

    tokio::task::spawn_blocking(move || {
        // The admin port runs under the same limits: a half-sent head and a
        // quiet kept-alive connection are cut there too.
        let mut slow_head = TcpStream::connect(admin.as_str()).unwrap();
        slow_head.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n").unwrap();
        let (took, answer) = until_closed(&mut slow_head, Duration::from_secs(5));
        assert!(took >= Duration::from_millis(900) && answer.is_empty(), "admin: {answer:?} after {took:?}");
        let mut idle = TcpStream::connect(admin.as_str()).unwrap();
        idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let (took, answer) = until_closed(&mut idle, Duration::from_secs(5));
        assert!(
            answer.starts_with("HTTP/1.1 200") && took >= Duration::from_millis(900),
            "admin: {answer:?} after {took:?}"
        );

        let address = address.as_str();
        // A half-sent head is dropped after the header timeout, unanswered.
        let mut slow_head = TcpStream::connect(address).unwrap();
        slow_head.write_all(b"GET /nothing HTTP/1.1\r\nHost: x\r\n").unwrap();
        let (took, answer) = until_closed(&mut slow_head, Duration::from_secs(5));
        assert!(took >= Duration::from_millis(900) && answer.is_empty(), "{answer:?} after {took:?}");

        let create_head = "POST /api/v1/sessions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
                           Content-Length: 100\r\n\r\n{\"pool\"";
        // A body that stops coming is answered 408.
        let mut stalled = TcpStream::connect(address).unwrap();
        stalled.write_all(create_head.as_bytes()).unwrap();
        let (took, answer) = until_closed(&mut stalled, Duration::from_secs(5));
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
        assert!(took >= Duration::from_millis(900), "cut after {took:?}");
        // So is a create's body that keeps coming but not in time: a byte at
        // 0.3, 0.6 and 0.9 s never pauses for the 1 s the server allows, yet
        // the whole body is due within 1 s; the pause alone would cut at 1.9 s.
        let mut trickle = TcpStream::connect(address).unwrap();
        trickle.write_all(create_head.as_bytes()).unwrap();
        let started = std::time::Instant::now();
        for _ in 0..3 {
            std::thread::sleep(Duration::from_millis(300));
            trickle.write_all(b" ").unwrap();
        }
        let (_, answer) = until_closed(&mut trickle, Duration::from_secs(5));
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
        assert!(started.elapsed() < Duration::from_millis(1800), "cut after {:?}", started.elapsed());

        // A kept-alive connection that goes quiet is closed.
        let mut idle = TcpStream::connect(address).unwrap();
        assert!(ask(&mut idle).starts_with("HTTP/1.1 404"));
        let (took, _) = until_closed(&mut idle, Duration::from_secs(5));
        assert!(took >= Duration::from_millis(900), "closed after {took:?}");

        // Three open connections fill the cap: a fourth is closed
        // unanswered, and the three are still served.
        let mut held: Vec<TcpStream> = (0..3).map(|_| TcpStream::connect(address).unwrap()).collect();
        for stream in &mut held {
            assert!(ask(stream).starts_with("HTTP/1.1 404"));
        }
        let mut fourth = TcpStream::connect(address).unwrap();
        let _ = fourth.write_all(b"GET /nothing HTTP/1.1\r\nHost: x\r\n\r\n");
        let (took, answer) = until_closed(&mut fourth, Duration::from_secs(2));
        assert!(answer.is_empty() && took < Duration::from_millis(900), "{answer:?} after {took:?}");
        assert!(ask(&mut held[0]).starts_with("HTTP/1.1 404"));
    })
    .await
    .unwrap();

    // Each cut is counted under its reason: the stalled body once by the
    // server, the trickled one by the create route.
    for reason in ["header_timeout", "idle", "connection_cap"] {
        let series = format!("tidepool_gateway_refusals_total{{reason=\"{reason}\"}}");
        assert!(metric(&gateway, &series).await >= 1.0, "no {reason} counted");
    }
    assert_eq!(metric(&gateway, "tidepool_gateway_refusals_total{reason=\"slow_body\"}").await, 2.0);
    assert_eq!(metric(&gateway, "tidepool_gateway_requests_total{code=\"408\",route=\"sessions\"}").await, 2.0);
}

/// The Ready condition's reason.
fn ready_reason(session: &TestSession) -> Option<String> {
    let status = session.status.as_ref()?;
    status.conditions.iter().find(|c| c.type_ == "Ready").map(|c| c.reason.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_whose_client_went_away_is_released_before_its_ttl() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let pools = [("open", 3, json!({ "public": true, "releaseWhenClientGoneSeconds": 10 }))];
    let Stage { cluster, operator, gateway, _runner } = stage(&[], &pools).await;
    let sessions: Api<TestSession> = Api::namespaced(cluster.client.clone(), "default");

    // One client keeps a WebSocket open past the grace; one never opens a
    // stream; one session is made around the gateway, which never sees its client.
    let (status, kept, _) = post(&gateway.url, None, json!({ "pool": "open" })).await;
    assert_eq!(status, 201, "{kept}");
    let (status, idle, _) = post(&gateway.url, None, json!({ "pool": "open" })).await;
    assert_eq!(status, 201, "{idle}");
    let (status, direct) = common::post_session(&operator, json!({ "pool": "open" })).await;
    assert_eq!(status, 201, "{direct}");
    let token = kept["token"].as_str().unwrap().to_string();
    let [kept, idle, direct] = [&kept, &idle, &direct].map(|v| v["name"].as_str().unwrap().to_string());
    let ws_url = format!("{}/s/ws?token={token}", gateway.url.replacen("http://", "ws://", 1));
    let (mut socket, _) = tokio_tungstenite::connect_async(&ws_url).await.unwrap();
    let opened = std::time::Instant::now();

    // The one that never opened a stream is released after the grace.
    let released = eventually(Duration::from_secs(30), "the idle session to be released", || async {
        let session = sessions.get(&idle).await.ok()?;
        (ready_reason(&session).as_deref() == Some("ClientGone")).then_some(session)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", gateway.process.log_tail(20)));
    assert_eq!(released.status.as_ref().map(|s| s.phase.to_string()).as_deref(), Some("Expired"));

    // The one with an open socket lives on past the grace, pinging.
    let mut seq = 0;
    while opened.elapsed() < Duration::from_secs(15) {
        seq += 1;
        socket.send(Message::text(json!({ "type": "ping", "seq": seq, "clientTimeUs": 1 }).to_string())).await.unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let alive = sessions.get(&kept).await.unwrap();
    assert_eq!(alive.status.as_ref().map(|s| s.phase.to_string()).as_deref(), Some("Ready"), "{:?}", alive.status);
    // Its client leaves: released within the grace and a tick or two.
    drop(socket);
    let left = std::time::Instant::now();
    eventually(Duration::from_secs(30), "the session whose client left to be released", || async {
        let session = sessions.get(&kept).await.ok()?;
        (ready_reason(&session).as_deref() == Some("ClientGone")).then_some(())
    })
    .await
    .unwrap();
    assert!(left.elapsed() >= Duration::from_secs(7), "released {:?} after its client left", left.elapsed());

    // The session made around the gateway keeps its pod: nothing says its client went.
    let untouched = sessions.get(&direct).await.unwrap();
    assert_eq!(untouched.status.as_ref().map(|s| s.phase.to_string()).as_deref(), Some("Ready"));
    assert!(!untouched.metadata.annotations.unwrap_or_default().contains_key("tidepool.dev/client-seen"));
}

/// The web UI in Debian's Chromium, driven by playwright-core
/// (web/tests/browser.mjs) through the gateway: one click runs the
/// bufferbloat test and the household, the grades land in the TestSession
/// and its link reads them back; the live graph moves, its pod is killed
/// and the session heals onto another; the cluster view, with an
/// operator's token, lists the pool, the session and a tube. Screenshots stay in
/// target/tmp/browser.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_web_ui_runs_the_connection_test_and_heals_the_live_graph_in_chromium() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let web = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../web");
    let dist = web.join("dist");
    assert!(
        dist.join("index.html").is_file() && web.join("node_modules/playwright-core").is_dir(),
        "the UI is not built: run `npm --prefix web ci && npm --prefix web run build` (tests/run.sh does)"
    );
    let pools = [("open", 2, json!({ "public": true }))];
    // A browser's test holds up to eight streams: the latency socket, three
    // downloads and three uploads, and a download that is closing.
    let gateway_flags = [format!("--ui-dir={}", dist.display()), "--streams-per-session=16".into()];
    let Stage { cluster, operator: _operator, gateway, _runner } = stage_with(&[], &pools, &gateway_flags).await;
    // A tube for the cluster view to list: the pool allows tubes nowhere,
    // so the operator ends it, Refused, before any pod is claimed.
    let tubes: Api<tidepool_crds::Tube> = Api::namespaced(cluster.client.clone(), "default");
    let tube: tidepool_crds::Tube = serde_json::from_value(json!({
        "apiVersion": "tidepool.dev/v1alpha1", "kind": "Tube", "metadata": { "name": "view-tube" },
        "spec": { "pool": "open", "conversationType": "socks5", "offer": "dj0wDQo=" }
    }))
    .unwrap();
    tubes.create(&Default::default(), &tube).await.unwrap();
    let out = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("browser");
    let _ = std::fs::remove_dir_all(&out);

    let run = tokio::process::Command::new("node")
        .arg(web.join("tests/browser.mjs"))
        .arg(&gateway.url)
        .arg(&out)
        // The harness's static token stands in for an operator's own.
        .env("TIDEPOOL_CLUSTER_TOKEN", TOKEN)
        .env("TIDEPOOL_CLUSTER_TUBE", "view-tube")
        .kill_on_drop(true)
        .output();
    let output =
        tokio::time::timeout(Duration::from_secs(300), run).await.expect("the browser run took over 5 minutes");
    let output = output.expect("node runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let context = || format!("stdout: {stdout}\nstderr: {stderr}\ngateway: {}", gateway.process.log_tail(30));
    assert!(output.status.success(), "the browser run failed\n{}", context());
    let report: Value =
        serde_json::from_str(stdout.lines().last().unwrap_or("")).unwrap_or_else(|e| panic!("{e}\n{}", context()));
    assert_eq!(report["pageErrors"], json!([]), "{}", context());
    // The content security policy lets the page do all it needs: a
    // violation would show only as a console error.
    let blocked = report["consoleErrors"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e.as_str().unwrap_or("").contains("Content Security Policy"));
    assert!(!blocked, "{}", context());

    // The grades on the page are the pod's, and the TestSession holds them.
    let results = &report["results"];
    let grades = &results["grades"];
    for grade in ["bufferbloat", "household", "overall"] {
        let letter = grades[grade].as_str().unwrap_or_else(|| panic!("no {grade} grade\n{}", context()));
        assert!(["A+", "A", "B", "C", "D", "F"].contains(&letter), "{letter}");
        assert_eq!(report["shownGrades"][grade].as_str(), Some(letter), "{}", context());
    }
    assert_eq!(results["household"].as_array().map(Vec::len), Some(4), "{}", context());
    assert!(results["downloadMbps"].as_f64().unwrap() > 0.0 && results["uploadMbps"].as_f64().unwrap() > 0.0);
    assert!(results["latency"]["samples"].as_i64().unwrap() > 0);
    let name = report["session"]["name"].as_str().unwrap();
    let sessions: Api<TestSession> = Api::namespaced(cluster.client.clone(), "default");
    let session = sessions.get(name).await.unwrap();
    let status = serde_json::to_value(session.status.unwrap()).unwrap();
    assert_eq!(status["phase"], "Completed", "{status}");
    assert_eq!(status["results"]["final"], true);
    assert_eq!(&status["results"]["grades"], grades);
    assert_eq!(status["results"]["downloadMbps"], results["downloadMbps"]);
    let users =
        |v: &Value| serde_json::from_value::<Vec<tidepool_crds::test_session::HouseholdUserResult>>(v.clone()).unwrap();
    assert_eq!(users(&status["results"]["household"]), users(&results["household"]));
    assert!(report["linkStatus"].as_str().unwrap().contains("Completed"), "{}", context());
    assert_eq!(report["linkGrades"]["bufferbloat"], grades["bufferbloat"]);
    assert_eq!(report["linkGrades"]["household"], grades["household"]);

    // The live graph moved, lost its pod and went on from another.
    let live = &report["live"];
    let heal = &live["heals"][0];
    assert_ne!(heal["from"], heal["to"], "{}", context());
    assert!(heal["gapMs"].as_f64().unwrap() > 0.0);
    assert!(live["points"].as_u64().unwrap() > live["pointsBeforeKill"].as_u64().unwrap() + 10, "{live}");
    assert!(live["frames"].as_u64().unwrap() > 0);
    // The cluster view listed the pool and the test's session with its grade.
    let cluster = &report["cluster"];
    assert!(
        cluster["pools"].as_array().unwrap().iter().any(|p| p["name"] == "open" && p["public"] == true),
        "{cluster}"
    );
    let listed = cluster["sessions"].as_array().unwrap().iter().find(|s| s["name"] == name).cloned();
    let listed = listed.unwrap_or_else(|| panic!("the test's session is not in the cluster view: {cluster}"));
    assert_eq!((&listed["phase"], &listed["grade"]), (&json!("Completed"), &grades["overall"]), "{cluster}");
    assert!(cluster["backends"].is_array());
    // And the tube, with its kind, its pool and why it ended.
    let tube = cluster["tubes"].as_array().unwrap().iter().find(|t| t["name"] == "view-tube").cloned();
    let tube = tube.unwrap_or_else(|| panic!("the tube is not in the cluster view: {cluster}"));
    assert_eq!((&tube["kind"], &tube["pool"]), (&json!("socks5"), &json!("open")), "{tube}");
    assert_eq!((&tube["state"], &tube["endReason"]), (&json!("Failed"), &json!("Refused")), "{tube}");
    assert_eq!(cluster["tubesTotal"], 1, "{cluster}");
    // The cluster view is for Kubernetes identities only, and its query is checked.
    let session_token = report["link"].as_str().unwrap().rsplit('/').next().unwrap().to_string();
    let http = reqwest::Client::new();
    let cluster_url = format!("{}/api/v1/cluster", gateway.url);
    for (bearer, query, code) in [
        (None, "", 401),
        (Some("not-a-token"), "", 401),
        (Some(session_token.as_str()), "", 403),
        (Some(TOKEN), "?namespace=Not_A_Namespace", 400),
        (Some(TOKEN), "?namespace=elsewhere", 403),
    ] {
        let mut request = http.get(format!("{cluster_url}{query}"));
        if let Some(bearer) = bearer {
            request = request.bearer_auth(bearer);
        }
        let answer = request.send().await.unwrap();
        assert_eq!(answer.status().as_u16(), code, "{bearer:?} {query}: {}", answer.text().await.unwrap());
    }
    // Each error reaches the page as a sentence, not a stack.
    let said = |key: &str| report[key].as_str().unwrap_or_default().to_string();
    assert!(said("badLinkStatus").starts_with("Cannot read the results: "), "{}", said("badLinkStatus"));
    assert!(said("clusterErrorStatus").starts_with("The cluster view stopped: "), "{}", said("clusterErrorStatus"));
    // While uploading, the page shows the upload's rate, and only it.
    assert!(said("uploadRates").starts_with("up ") && !said("uploadRates").contains("down"), "{}", said("uploadRates"));
    let limit = said("limitStatus");
    assert!(limit.starts_with("The test stopped: ") && limit.contains("; try again in"), "{limit}");
    assert!(!limit.contains(") ("), "two parentheses in a row: {limit}");
    // While its session is being made, the page says so and the button waits.
    assert!(said("loadingStatus").starts_with("Getting a session"), "{}", said("loadingStatus"));
    assert_eq!(report["loadingButtonDisabled"], true, "the button could start a second test");
    for shot in [
        "test-ready",
        "test-loading",
        "test-running",
        "test-running-upload",
        "test-household-running",
        "test-results",
        "results-link",
        "results-error",
        "live",
        "live-healed",
        "cluster",
        "cluster-error",
        "test-error",
    ] {
        assert!(out.join(format!("{shot}.png")).is_file(), "no {shot}.png");
    }
    assert!(metric(&gateway, r#"tidepool_gateway_requests_total{code="200",route="ui"}"#).await >= 3.0);
    println!("browser: {report}");
}

/// What a 20 Mbit/s `tbf` lets through as TCP payload (1448 bytes of 1514
/// on the wire), which is what any application can measure.
const SHAPED_PAYLOAD_MBIT: f64 = 20.0 * 1448.0 / 1514.0;

/// The web UI on a shaped line: the whole cluster (control plane, operator,
/// session pods, gateway) runs in the server namespace of a path shaped to
/// 20 Mbit/s, and Chromium in the client namespace, so every byte the
/// browser measures crosses the shaper. On the shallow buffer the
/// browser's rates are within 10 % of the line; on both, its bufferbloat
/// grade is the letter the CLI gets on the same line,
/// through the same gateway. The senders use Reno, which fills a buffer
/// the way most of the internet's senders do. The buffers are sized so the
/// letters compare what was measured, not noise at a cut-point. 700 ms
/// puts every rise far over the 400 ms cut into F: the browser's pings
/// ride TCP, so a pong lost at the full queue waits for its
/// retransmission (the browser's download rise is over the buffer's
/// depth), and its uploads leave gaps (its upload rise is under it);
/// together they moved the browser's rises by 100 ms either way of the
/// CLI's. With 350 ms (rises of 340 to 460, either side of 400) a slow
/// machine graded the browser F and the CLI D; with 300 ms the rises sat
/// at the 200 ms cut between C and D. 15 ms keeps every rise between 5
/// and 30, an A.
#[test]
fn on_a_shaped_line_the_browser_measures_the_line_and_grades_as_the_cli_does() {
    use tidepool_tests::netns::{Shape, ShapedPath, namespaces_available};
    let _alone = ONE_AT_A_TIME.blocking_lock();
    if let Err(why) = namespaces_available() {
        panic!("this test needs network namespaces (run as root), but: {why}");
    }
    let mut grades = Vec::new();
    for (prefix, subnet, queue_ms) in [("tpbd", 237, 700), ("tpbs", 238, 15)] {
        let shape = Shape { rate_mbit: 20, queue_ms, congestion: Some("reno") };
        let path = ShapedPath::create(prefix, subnet, shape).unwrap();
        let outcome = std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    // This thread, the runtime's threads and every process
                    // they start live in the server namespace.
                    path.enter(&path.server_ns()).unwrap();
                    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build();
                    runtime.unwrap().block_on(browser_and_cli_on(&path, queue_ms))
                })
                .join()
        });
        match outcome {
            Ok(grade) => grades.push(grade),
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
    let rank = |grade: &str| ["A+", "A", "B", "C", "D", "F"].iter().position(|g| *g == grade);
    assert!(rank(&grades[0]) > rank(&grades[1]), "the deep buffer graded {}, the shallow one {}", grades[0], grades[1]);
}

/// Runs the browser's test and the CLI's on `path`; the letter they agree on.
async fn browser_and_cli_on(path: &tidepool_tests::netns::ShapedPath, queue_ms: u32) -> String {
    let web = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../web");
    assert!(web.join("dist/index.html").is_file(), "the UI is not built: run `npm --prefix web run build`");
    let port = free_port().unwrap();
    let flags = [
        format!("--ui-dir={}", web.join("dist").display()),
        "--streams-per-session=16".into(),
        // Reached from the client namespace, across the shaper.
        format!("--listen=0.0.0.0:{port}"),
    ];
    let pools = [("open", 2, json!({ "public": true }))];
    let Stage { cluster, operator: _operator, gateway, _runner } = stage_with(&[], &pools, &flags).await;
    let url = format!("http://{}:{port}", path.server_ip);
    let out = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("browser-shaped-{queue_ms}ms"));
    let _ = std::fs::remove_dir_all(&out);
    let in_client = |program: &std::path::Path| {
        let mut command = tokio::process::Command::new("ip");
        command.args(["netns", "exec", &path.client_ns()]).arg(program).kill_on_drop(true);
        command
    };

    let browser = in_client(std::path::Path::new("node"))
        .arg(web.join("tests/browser.mjs"))
        .args([url.as_str(), out.to_str().unwrap(), "test"])
        .output();
    let browser = tokio::time::timeout(Duration::from_secs(180), browser).await.expect("the browser took 3 minutes");
    let browser = browser.unwrap();
    let context = format!(
        "{}\n{}\ngateway: {}",
        String::from_utf8_lossy(&browser.stdout),
        String::from_utf8_lossy(&browser.stderr),
        gateway.process.log_tail(20)
    );
    assert!(browser.status.success(), "the browser run failed on the {queue_ms} ms line\n{context}");
    let report: Value = serde_json::from_slice(browser.stdout.split(|b| *b == b'\n').rfind(|l| !l.is_empty()).unwrap())
        .unwrap_or_else(|e| panic!("{e}\n{context}"));
    let results = &report["results"];

    let cli = workspace_binary("tidepool-cli", "tidepool").unwrap();
    let token_file = cluster.token_file().display().to_string();
    let args = ["run", "--operator", &url, "--api-token-file", &token_file, "--pool", "open"];
    let run = in_client(&cli).args(args).args(["--profile", "bufferbloat", "--json"]).output();
    let run = tokio::time::timeout(Duration::from_secs(120), run).await.expect("the CLI took 2 minutes").unwrap();
    let cli_out = String::from_utf8_lossy(&run.stdout);
    if !run.status.success() {
        let mut pods = String::new();
        for entry in std::fs::read_dir(cluster.plane.dir()).unwrap().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with("pod-") {
                let log = std::fs::read_to_string(entry.path()).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(15).collect();
                pods.push_str(&format!("--- {name}\n{}\n", tail.into_iter().rev().collect::<Vec<_>>().join("\n")));
            }
        }
        panic!(
            "the CLI failed: {cli_out}\n{}\ngateway: {}\n{pods}",
            String::from_utf8_lossy(&run.stderr),
            gateway.process.log_tail(30)
        );
    }
    let cli_results: Value = serde_json::from_str(cli_out.trim()).unwrap_or_else(|e| panic!("{e}: {cli_out}"));
    let cli_results = cli_results.get("results").unwrap_or(&cli_results);
    eprintln!("{queue_ms} ms buffer: browser {results}\nCLI {cli_results}");

    // Through the deep buffer Reno's tail drops sometimes cost a sixth of
    // the rate, the CLI's as much as the browser's: the line delivered
    // less. The rates are held to the line where it delivers all of it.
    let rates_checked = if queue_ms <= 20 { &["downloadMbps", "uploadMbps"][..] } else { &[] };
    for direction in rates_checked {
        let rate = results[direction].as_f64().unwrap_or_else(|| panic!("no {direction}: {results}"));
        let off = (rate - SHAPED_PAYLOAD_MBIT).abs() / SHAPED_PAYLOAD_MBIT;
        assert!(
            off <= 0.10,
            "{queue_ms} ms buffer: the browser's {direction} {rate:.2} is {:.1} % off the line",
            off * 100.0
        );
    }
    let grade = |results: &Value| results["grades"]["bufferbloat"].as_str().map(str::to_string);
    assert!(grade(results).is_some(), "{results}");
    assert_eq!(grade(results), grade(cli_results), "{queue_ms} ms buffer: browser {results}\nCLI {cli_results}");
    grade(results).unwrap_or_default()
}

/// An application behind the router's reverse proxy: a server on loopback
/// that says who it is and what it was sent, streams server-sent events
/// (the second only once the test says so), and echoes a WebSocket.
struct App {
    port: u16,
    /// Lets the event stream send its second event.
    release: std::sync::Arc<tokio::sync::Notify>,
}

async fn start_app(name: &'static str) -> App {
    use axum::body::{Body, Bytes};
    use axum::extract::ws::{Message as WsMessage, WebSocketUpgrade};
    use axum::http::{HeaderMap, Method, Uri};
    use axum::routing::{any, get};
    let release = std::sync::Arc::new(tokio::sync::Notify::new());
    let echo = move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| async move {
        let header = |n: &str| headers.get(n).and_then(|v| v.to_str().ok()).map(str::to_string);
        axum::Json(json!({
            "backend": name, "method": method.as_str(), "path": uri.path(), "query": uri.query(),
            "authorization": header("authorization"), "forwardedFor": header("x-forwarded-for"),
            "body": String::from_utf8_lossy(&body),
        }))
    };
    let released = release.clone();
    let events = move || async move {
        let stream = futures_util::stream::unfold(0, move |step| {
            let released = released.clone();
            async move {
                match step {
                    0 => Some((Ok::<_, std::io::Error>(Bytes::from_static(b"data: one\n\n")), 1)),
                    1 => {
                        released.notified().await;
                        Some((Ok(Bytes::from_static(b"data: two\n\n")), 2))
                    }
                    _ => None,
                }
            }
        });
        ([("content-type", "text/event-stream")], Body::from_stream(stream))
    };
    let ws = |upgrade: WebSocketUpgrade| async move {
        upgrade.on_upgrade(|mut socket| async move {
            while let Some(Ok(message)) = socket.recv().await {
                if let WsMessage::Text(text) = message
                    && socket.send(WsMessage::Text(text)).await.is_err()
                {
                    break;
                }
            }
        })
    };
    let app =
        axum::Router::new().route("/app/echo", any(echo)).route("/app/events", get(events)).route("/app/ws", get(ws));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    App { port, release }
}

/// The reports an external backend's agent would send: `cores` percent busy
/// on each of 64 cores and `memory` percent of 16 GiB used, in a 1 s window
/// (so the router's pending picks clear within a second or two).
fn external_report(backend: &str, seq: u64, (cores, memory): (f32, u64)) -> tidepool_wire::report::AgentReport {
    use tidepool_wire::report::{AgentReport, Capacity, ReportKind, Window};
    let total: u64 = 16 << 30;
    let capacity = Capacity { cores: 64, memory_bytes: total, disk_bytes: 1 << 40, gpus: vec![] };
    let window = Window {
        seconds: 1,
        samples: 4,
        cores: vec![cores; 64],
        memory_used_bytes: total / 100 * memory,
        ..Window::default()
    };
    let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    // Where the agent says it is: the admin's Backend address wins.
    let address = Some("agent.example:443".to_string());
    let report = AgentReport::new(backend, ReportKind::External, capacity, vec![window]);
    AgentReport { seq, sampled_at_ms: now_ms, interval_ms: 250, address, ..report }
}

/// The router's reverse proxy on the harness: two applications on loopback
/// registered as external Backends, their load reported through the
/// operator's API as their agents would, and the gateway routing `/app` by
/// the request's tier (header, query or JSON body field) and sticky key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routed_paths_reach_the_backend_the_router_picks_for_the_tier_and_keep_a_sticky_key_there() {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};
    use tidepool_crds::Backend;
    let _alone = ONE_AT_A_TIME.lock().await;
    let cluster = Cluster::start(1).await;
    let report_token =
        cluster.plane.service_account_token("default", "tidepool-agent", "tidepool", None).await.unwrap();
    let operator = cluster
        .operator(
            "operator-0",
            &[
                "--no-agent-daemonset",
                "--allow-local-backend-addresses",
                "--health-probe-interval-seconds=2",
                "--health-probe-timeout-seconds=1",
            ],
        )
        .await;
    let (a, b) = (start_app("app-a").await, start_app("app-b").await);
    let backends: Api<Backend> = Api::all(cluster.client.clone());
    for (name, app) in [("app-a", &a), ("app-b", &b)] {
        let backend: Backend = serde_json::from_value(json!({
            "apiVersion": tidepool_crds::API_VERSION, "kind": "Backend",
            "metadata": { "name": name },
            "spec": { "kind": "external", "address": format!("127.0.0.1:{}", app.port),
                      "healthCheck": { "type": "tcp", "port": app.port, "intervalSeconds": 2, "timeoutSeconds": 1 } }
        }))
        .unwrap();
        backends.create(&Default::default(), &backend).await.unwrap();
    }
    // a: idle cores, but 70 % of its memory used (4.8 GiB free); b: busier
    // cores, memory free. Small requests go to a; one that needs 6 GiB to b.
    let loads = Arc::new(Mutex::new(HashMap::from([("app-a", (2.0, 70)), ("app-b", (78.0, 5))])));
    // The operator takes an external backend's reports once its watch has
    // the Backend: until then a report is refused (403).
    let reports = format!("{}/api/v1/agents/report", operator.url);
    for name in ["app-a", "app-b"] {
        eventually(Duration::from_secs(30), &format!("a report for {name} taken"), || async {
            let report = external_report(name, 0, (50.0, 50));
            let sent = reqwest::Client::new().post(&reports).bearer_auth(&report_token).json(&report).send().await;
            sent.ok()?.status().is_success().then_some(())
        })
        .await
        .unwrap();
    }
    let reporter = {
        let (loads, url, token) = (loads.clone(), format!("{}/api/v1/agents/report", operator.url), report_token);
        tokio::spawn(async move {
            let http = reqwest::Client::new();
            for seq in 1.. {
                let now: Vec<(&str, (f32, u64))> = loads.lock().unwrap().iter().map(|(k, v)| (*k, *v)).collect();
                for (name, load) in now {
                    let report = external_report(name, seq, load);
                    // The operator stopping at the test's end is not a failure.
                    let Ok(sent) = http.post(&url).bearer_auth(&token).json(&report).send().await else { return };
                    assert!(sent.status().is_success(), "report for {name}: {}", sent.text().await.unwrap());
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
    };
    for name in ["app-a", "app-b"] {
        eventually(Duration::from_secs(30), &format!("Backend {name} healthy"), || async {
            let backend = backends.get(name).await.ok()?;
            (backend.status?.health == tidepool_crds::backend::Health::Healthy).then_some(())
        })
        .await
        .unwrap();
    }
    let tiers = r#"--routed-tiers={"small":{"vcpu":1,"memoryMiB":64},"large":{"vcpu":1,"memoryMiB":6144},"gpu":{"vcpu":1,"memoryMiB":64,"gpus":1}}"#;
    let extra = ["--routed-paths=/app".to_string(), tiers.to_string()];
    let gateway = start_gateway_with(&cluster, &operator.url, "gateway", &extra).await;

    let http = reqwest::Client::new();
    let ask = |path: &str, tier: Option<&str>, sticky: Option<&str>| {
        let mut request = http.get(format!("{}{path}", gateway.url)).bearer_auth("the-apps-own-token");
        if let Some(tier) = tier {
            request = request.header("x-tidepool-tier", tier);
        }
        if let Some(sticky) = sticky {
            request = request.header("x-tidepool-sticky", sticky);
        }
        async move {
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            let backend = response.headers().get("x-tidepool-backend").map(|v| v.to_str().unwrap().to_string());
            (status, backend, response.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    // The tier in a header; the path, query, method and the app's own
    // credentials reach the app; the gateway says who the client is.
    let (status, backend, seen) = ask("/app/echo?x=1", Some("small"), Some("alice")).await;
    assert_eq!((status, backend.as_deref()), (200, Some("app-a")), "{seen}");
    assert_eq!(
        (&seen["backend"], &seen["method"], &seen["path"], &seen["query"]),
        (&json!("app-a"), &json!("GET"), &json!("/app/echo"), &json!("x=1")),
        "{seen}"
    );
    assert_eq!(seen["authorization"], "Bearer the-apps-own-token");
    assert_eq!(seen["forwardedFor"], "127.0.0.1");
    // 6 GiB fits only b.
    let (status, backend, seen) = ask("/app/echo", Some("large"), Some("alice")).await;
    assert_eq!((status, backend.as_deref()), (200, Some("app-b")), "{seen}");
    // The tier in the query.
    let (status, backend, _) = ask("/app/echo?tier=small", None, Some("carol")).await;
    assert_eq!((status, backend.as_deref()), (200, Some("app-a")));
    // The tier in a JSON body, which reaches the app whole.
    let body = json!({ "tier": "large", "payload": "x".repeat(1000) }).to_string();
    let response = http
        .post(format!("{}/app/echo", gateway.url))
        .header("content-type", "application/json")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let seen: Value = response.json().await.unwrap();
    assert_eq!(
        (&seen["backend"], &seen["method"], seen["body"].as_str()),
        (&json!("app-b"), &json!("POST"), Some(body.as_str()))
    );

    // No backend has a GPU: a 503 that says when to retry.
    let response = http.get(format!("{}/app/echo", gateway.url)).header("x-tidepool-tier", "gpu").send().await.unwrap();
    assert_eq!(response.status().as_u16(), 503);
    assert_eq!(response.headers()["retry-after"], "1");
    let refused: Value = response.json().await.unwrap();
    assert!(refused["error"].as_str().unwrap().contains("no backend has room for tier gpu"), "{refused}");
    // Requests that name no tier, an unknown one, a bad sticky key, or an
    // overlong JSON body with the tier inside are refused and reach no app.
    let refusals = [
        (ask("/app/echo", None, None).await, 400, "name a tier"),
        (ask("/app/echo", Some("huge"), None).await, 400, "not one this gateway routes"),
        (ask("/app/echo?tier=huge", None, None).await, 400, "not one this gateway routes"),
        (ask("/app/echo", Some("small"), Some(&"k".repeat(300))).await, 400, "x-tidepool-sticky"),
    ];
    for ((status, backend, body), code, says) in refusals {
        assert_eq!((status, backend), (code, None), "{body}");
        assert!(body["error"].as_str().unwrap().contains(says), "{body}");
    }
    let huge = json!({ "tier": "small", "payload": "x".repeat(100_000) }).to_string();
    let response = http
        .post(format!("{}/app/echo", gateway.url))
        .header("content-type", "application/json")
        .body(huge)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 413);
    // A path that only begins like the prefix is not routed.
    let (status, backend, _) = ask("/apple", Some("small"), None).await;
    assert_eq!((status, backend), (404, None));

    // The loads turn round: new keys go to b now, and alice's small
    // requests stay with a, where her key has been.
    *loads.lock().unwrap() = HashMap::from([("app-a", (78.0, 70)), ("app-b", (2.0, 5))]);
    let mut attempt = 0;
    eventually(Duration::from_secs(20), "a new key routed to b", || {
        attempt += 1;
        let key = format!("dave-{attempt}");
        let ask = &ask;
        async move { (ask("/app/echo", Some("small"), Some(&key)).await.1.as_deref() == Some("app-b")).then_some(()) }
    })
    .await
    .unwrap();
    let (status, backend, _) = ask("/app/echo", Some("small"), Some("alice")).await;
    assert_eq!((status, backend.as_deref()), (200, Some("app-a")), "alice's key stays with a");

    // Server-sent events come as they are sent: the first before the app sends the second.
    let mut events = http
        .get(format!("{}/app/events", gateway.url))
        .header("x-tidepool-tier", "small")
        .header("x-tidepool-sticky", "alice")
        .send()
        .await
        .unwrap();
    assert_eq!(events.headers()["content-type"], "text/event-stream");
    let first = tokio::time::timeout(Duration::from_secs(10), events.chunk()).await.expect("the first event came");
    assert_eq!(first.unwrap().unwrap(), "data: one\n\n");
    a.release.notify_one();
    let rest = tokio::time::timeout(Duration::from_secs(10), events.text()).await.unwrap().unwrap();
    assert_eq!(rest, "data: two\n\n");

    // A WebSocket, through to the app and back.
    let ws_url = format!("{}/app/ws?tier=small", gateway.url.replace("http://", "ws://"));
    let (mut socket, _) = tokio_tungstenite::connect_async(ws_url).await.unwrap();
    socket.send(Message::Text("ping 1".into())).await.unwrap();
    let echoed = tokio::time::timeout(Duration::from_secs(10), socket.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(echoed, Message::Text("ping 1".into()));
    drop(socket);

    assert!(metric(&gateway, r#"tidepool_gateway_requests_total{code="200",route="routed"}"#).await >= 7.0);
    assert_eq!(metric(&gateway, r#"tidepool_gateway_refusals_total{reason="unknown_tier"}"#).await, 2.0);
    assert_eq!(metric(&gateway, r#"tidepool_gateway_refusals_total{reason="no_backend"}"#).await, 1.0);
    assert!(metric(&gateway, r#"tidepool_gateway_proxied_bytes_total{direction="to_backend"}"#).await >= 1000.0);
    assert!(metric(&gateway, r#"tidepool_gateway_proxied_bytes_total{direction="from_backend"}"#).await > 0.0);
    reporter.abort();
    drop(b);
}

/// The bytes one address's sessions may move in an hour are counted over
/// every replica: each writes what it proxied on the session under its own
/// name, and the other reads it from its watch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_addresss_bytes_per_hour_are_shared_by_the_replicas() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let pools = [("open", 3, json!({ "public": true }))];
    let limits = |replica: &str| {
        vec![
            "--anonymous-mib-per-hour=4".to_string(),
            "--anonymous-concurrent-sessions=3".to_string(),
            format!("--replica={replica}"),
        ]
    };
    let Stage { cluster, operator, gateway, _runner } = stage_with(&[], &pools, &limits("gateway-1")).await;
    let second = start_gateway_with(&cluster, &operator.url, "gateway-2", &limits("gateway-2")).await;
    let sessions: Api<TestSession> = Api::namespaced(cluster.client.clone(), "default");

    let (status, view, _) = post(&gateway.url, None, json!({ "pool": "open" })).await;
    assert_eq!(status, 201, "{view}");
    let (name, token) = (view["name"].as_str().unwrap().to_string(), view["token"].as_str().unwrap().to_string());
    // A second of download through the first replica: far more than 4 MiB.
    let download =
        reqwest::Client::new().get(format!("{}/s/download?seconds=1", gateway.url)).bearer_auth(&token).send().await;
    let downloaded = download.unwrap().bytes().await.unwrap().len() as u64;
    assert!(downloaded > 4 << 20, "a second of download gave {downloaded} bytes");
    // The first replica writes what it proxied on the session, under its name.
    let written = eventually(Duration::from_secs(20), "the first replica's bytes on the session", || async {
        let session = sessions.get(&name).await.ok()?;
        let value: u64 = session.metadata.annotations?.get("bytes.tidepool.dev/gateway-1")?.parse().ok()?;
        (value >= downloaded).then_some(value)
    })
    .await
    .unwrap();
    assert!(written < downloaded + (64 << 10), "{written} written for {downloaded} downloaded");

    // The second replica, which proxied none of it, refuses the address a
    // new stream and a new session, and says when to come back.
    let refused = eventually(Duration::from_secs(20), "the second replica's refusal", || async {
        let (status, body) = info(&format!("{}/s", second.url), &token).await;
        (status == 429).then_some(body)
    })
    .await
    .unwrap();
    assert!(refused["error"].as_str().unwrap().contains("MiB in the last hour"), "{refused}");
    let (status, body, retry) = post(&second.url, None, json!({ "pool": "open" })).await;
    assert_eq!(status, 429, "{body}");
    let retry: u64 = retry.unwrap().parse().unwrap();
    assert!((3500..=3600).contains(&retry), "retry after {retry} s");
    // The first replica too.
    assert_eq!(info(&format!("{}/s", gateway.url), &token).await.0, 429);
    assert!(metric(&second, r#"tidepool_gateway_refusals_total{reason="bytes_per_hour"}"#).await >= 2.0);
    let sessions_now = sessions.list(&Default::default()).await.unwrap().items.len();
    assert_eq!(sessions_now, 1, "a refused create made a session");
}

/// The UDP echo from outside the cluster: the CLI, given only the gateway,
/// asks its pod for a grant through it and gets the gateway's UDP port;
/// its probes are relayed to the pod with its address and the echoes come
/// back, so loss and jitter come from UDP. Datagrams that are not probes,
/// or carry a cookie no grant gave, reach no pod and get no answer. A
/// grant through one replica is relayed by another too: the route is
/// written on the session, and the second replica fetches its relay ticket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_clis_udp_echo_is_relayed_by_the_gateway_and_stray_datagrams_go_nowhere() {
    use tidepool_protocol::pod::UdpProbe;
    let _alone = ONE_AT_A_TIME.lock().await;
    let pools = [("open", 1, json!({ "public": true }))];
    let Stage { cluster, operator, gateway, _runner } = stage(&[], &pools).await;
    let relayed = |direction: &str| {
        format!(r#"tidepool_gateway_udp_datagrams_total{{direction="{direction}",outcome="relayed"}}"#)
    };
    assert_eq!(metric(&gateway, &relayed("to_client")).await, 0.0);

    let cli = workspace_binary("tidepool-cli", "tidepool").unwrap();
    let token_file = cluster.token_file().display().to_string();
    let args = ["run", "--operator", &gateway.url, "--api-token-file", &token_file, "--pool", "open"];
    let run = tokio::process::Command::new(&cli).args(args).args(["--profile", "latency", "--json"]).output();
    let run = tokio::time::timeout(Duration::from_secs(120), run).await.expect("the CLI took 2 minutes").unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&run.stdout), String::from_utf8_lossy(&run.stderr));
    assert!(run.status.success(), "{stdout}\n{stderr}\ngateway: {}", gateway.process.log_tail(30));
    assert!(!stderr.contains("no UDP echo"), "the CLI fell back to the WebSocket: {stderr}");
    let out: Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    let results = out.get("results").unwrap_or(&out);
    assert_eq!(results["latency"]["lossPercent"].as_f64(), Some(0.0), "{results}");
    let (to_pod, to_client) =
        (metric(&gateway, &relayed("to_pod")).await, metric(&gateway, &relayed("to_client")).await);
    assert!(to_client >= 10.0 && to_client == to_pod, "relayed {to_pod} to the pod, {to_client} back");

    // Stray datagrams at the relay's port (the gateway's port, as UDP).
    let relay_port = gateway.url.rsplit(':').next().unwrap();
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    socket.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    let relay = format!("127.0.0.1:{relay_port}");
    let mut forged = [0u8; 64];
    UdpProbe { cookie: 42, seq: 0, client_time_us: 1, server_time_us: 0 }.write(&mut forged).unwrap();
    socket.send_to(b"not a probe at all", &relay).unwrap();
    socket.send_to(&forged, &relay).unwrap();
    let mut answer = [0u8; 2048];
    assert!(socket.recv_from(&mut answer).is_err(), "a stray datagram was answered");
    let dropped =
        |outcome: &str| format!(r#"tidepool_gateway_udp_datagrams_total{{direction="to_pod",outcome="{outcome}"}}"#);
    assert_eq!(metric(&gateway, &dropped("not_a_probe")).await, 1.0);
    assert_eq!(metric(&gateway, &dropped("unknown_cookie")).await, 1.0);
    assert_eq!(metric(&gateway, &relayed("to_pod")).await, to_pod, "nothing more reached a pod");

    // A grant through the first replica; the datagrams to a second one.
    let second = start_gateway_with(&cluster, &operator.url, "gateway-b", &[]).await;
    let (status, view, _) = post(&gateway.url, None, json!({ "pool": "open" })).await;
    assert_eq!(status, 201, "{view}");
    let token = view["token"].as_str().unwrap();
    let grant =
        reqwest::Client::new().post(format!("{}/s/api/v1/udp", gateway.url)).bearer_auth(token).send().await.unwrap();
    assert_eq!(grant.status().as_u16(), 200);
    let grant: Value = grant.json().await.unwrap();
    assert_eq!(grant["port"].as_u64(), Some(relay_port.parse().unwrap()), "the gateway's port, not the pod's: {grant}");
    let cookie = grant["cookie"].as_u64().unwrap();
    let second_relay = format!("127.0.0.1:{}", second.url.rsplit(':').next().unwrap());
    let mut seq = 0;
    let echoed = eventually(Duration::from_secs(15), "an echo through the second replica", || {
        seq += 1;
        let mut probe = [0u8; 64];
        UdpProbe { cookie, seq, client_time_us: 1, server_time_us: 0 }.write(&mut probe).unwrap();
        socket.send_to(&probe, &second_relay).unwrap();
        let mut answer = [0u8; 2048];
        let got = socket.recv_from(&mut answer).ok().and_then(|(len, _)| UdpProbe::read(&answer[..len]).ok());
        async move { got.filter(|p| p.cookie == cookie && p.server_time_us > 0) }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\nsecond replica: {}", second.process.log_tail(30)));
    assert!(echoed.seq >= 1);
    assert!(metric(&second, &relayed("to_client")).await >= 1.0);
    // The first probes came before its route: counted while it was fetched.
    let waited = r#"tidepool_gateway_udp_datagrams_total{direction="to_pod",outcome="resolving"}"#;
    assert!(metric(&second, waited).await >= 1.0);
}
