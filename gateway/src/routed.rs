//! The resource-aware router's reverse proxy: a request under one of the
//! configured path prefixes goes to the backend the operator's router picks
//! for the request's tier (named in a header, the query or a JSON body
//! field), its path and query kept, its streams (server-sent events,
//! WebSockets, long bodies) passed on as they come.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv6Addr;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri, header};
use bytes::Bytes;
use tidepool_crds::warm_pool::Tier;
use tidepool_protocol::api::{ROUTE_PATH, RouteAnswer, RouteRequest};

use crate::proxy::{self, Counted};
use crate::reply::{self, Refused};
use crate::state::Gateway;

/// The metric label of routed requests.
const ROUTE: &str = "routed";
/// The most of a body read to find the tier in it.
pub const MAX_TIER_BODY_BYTES: usize = 64 << 10;
/// The header that tells the client which backend answered.
const BACKEND: HeaderName = HeaderName::from_static("x-tidepool-backend");
/// A pick is used again for the same sticky key and tier for this long: a
/// client's burst of requests costs one call to the router, not one each,
/// and placement still follows the load within a second.
pub const PICK_REUSE: Duration = Duration::from_secs(1);
/// Picks kept at most; past this the cache starts again empty.
const MAX_PICKS: usize = 10_000;
/// Paths the gateway serves itself: a routed prefix may not shadow them.
const RESERVED: [&str; 3] = ["/api", "/s", "/assets"];

/// What is routed, and how a request names its tier.
#[derive(Clone, Debug)]
pub struct Routes {
    /// Path prefixes, each `/` and more, without a trailing `/`.
    pub prefixes: Vec<String>,
    pub tiers: BTreeMap<String, Tier>,
    /// The tier of a request that names none; without it such a request is refused.
    pub default_tier: Option<String>,
    pub tier_header: HeaderName,
    pub tier_query: String,
    /// The top-level field of a JSON body that may name the tier; bodies are not read when unset.
    pub tier_field: Option<String>,
    /// The header whose value keeps a client on one backend; the client's
    /// address does when it is absent.
    pub sticky_header: HeaderName,
    /// The port on a backend whose address names none.
    pub backend_port: u16,
}

/// The routing flags, as given.
pub struct RouteFlags<'a> {
    pub prefixes: &'a [String],
    pub tiers_json: &'a str,
    pub default_tier: Option<&'a str>,
    pub tier_header: &'a str,
    pub tier_query: &'a str,
    pub tier_field: &'a str,
    pub sticky_header: &'a str,
    pub backend_port: u16,
}

impl Routes {
    /// The routes the flags describe: none when no prefix is given.
    pub fn parse(flags: &RouteFlags<'_>) -> Result<Option<Routes>, String> {
        let prefixes: Vec<String> =
            flags.prefixes.iter().map(|p| p.trim()).filter(|p| !p.is_empty()).map(str::to_string).collect();
        if prefixes.is_empty() {
            return Ok(None);
        }
        for prefix in &prefixes {
            check_prefix(prefix)?;
        }
        let tiers: BTreeMap<String, Tier> = serde_json::from_str(flags.tiers_json)
            .map_err(|e| format!("the tiers are not a JSON map of tiers: {e}"))?;
        if tiers.is_empty() {
            return Err("routed paths need at least one tier".into());
        }
        for (name, tier) in &tiers {
            if !is_tier_name(name) {
                return Err(format!("tier name {name:?} must be 1 to 63 of a-z, 0-9 and '-'"));
            }
            let probe = RouteRequest {
                tier: tier.clone(),
                client_address: None,
                coordinates: None,
                sticky_key: None,
                weights: None,
            };
            probe.check().map_err(|e| format!("tier {name}: {e}"))?;
        }
        let default_tier = flags.default_tier.map(str::trim).filter(|t| !t.is_empty()).map(str::to_string);
        if let Some(default) = &default_tier
            && !tiers.contains_key(default)
        {
            return Err(format!("the default tier {default} is not one of the tiers"));
        }
        let header =
            |text: &str| HeaderName::try_from(text.trim()).map_err(|_| format!("{text:?} is not a header name"));
        let tier_query = flags.tier_query.trim();
        if tier_query.is_empty() || !tier_query.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
            return Err(format!("the tier's query parameter {tier_query:?} must be letters, digits, '_' or '-'"));
        }
        let tier_field = flags.tier_field.trim();
        Ok(Some(Routes {
            prefixes,
            tiers,
            default_tier,
            tier_header: header(flags.tier_header)?,
            tier_query: tier_query.to_string(),
            tier_field: (!tier_field.is_empty()).then(|| tier_field.to_string()),
            sticky_header: header(flags.sticky_header)?,
            backend_port: flags.backend_port,
        }))
    }

    /// The tier a request names in its header or query, refused when it
    /// names one this gateway does not route. `None`: it names none there.
    pub fn named_tier(&self, headers: &HeaderMap, query: Option<&str>) -> Result<Option<String>, Refused> {
        let named = match headers.get(&self.tier_header) {
            Some(value) => Some(value.to_str().map_err(|_| unknown_tier())?.trim().to_string()),
            None => query.and_then(|q| {
                serde_urlencoded::from_str::<Vec<(String, String)>>(q)
                    .ok()?
                    .into_iter()
                    .find_map(|(key, value)| (key == self.tier_query).then_some(value))
            }),
        };
        named.map(|name| self.known(name)).transpose()
    }

    /// The tier a JSON body names in the tier field, if it does.
    pub fn tier_in_body(&self, body: &[u8]) -> Result<Option<String>, Refused> {
        let Some(field) = &self.tier_field else { return Ok(None) };
        let Ok(serde_json::Value::Object(object)) = serde_json::from_slice::<serde_json::Value>(body) else {
            return Ok(None);
        };
        match object.get(field) {
            None => Ok(None),
            Some(serde_json::Value::String(name)) => self.known(name.clone()).map(Some),
            Some(_) => Err(unknown_tier()),
        }
    }

    /// The tier of a request that named none: the default, if there is one.
    pub fn or_default(&self, named: Option<String>) -> Result<(String, Tier), Refused> {
        let name = named.or_else(|| self.default_tier.clone()).ok_or_else(|| {
            let message =
                format!("name a tier: the {} header or the {} query parameter", self.tier_header, self.tier_query);
            Refused::new(StatusCode::BAD_REQUEST, "no_tier", message)
        })?;
        let tier = self.tiers.get(&name).cloned().ok_or_else(unknown_tier)?;
        Ok((name, tier))
    }

    /// The request's sticky key, when its header is there.
    pub fn sticky_key(&self, headers: &HeaderMap) -> Result<Option<String>, Refused> {
        let Some(value) = headers.get(&self.sticky_header) else { return Ok(None) };
        let key = value.to_str().map(str::trim).unwrap_or_default();
        if key.is_empty() || key.len() > 253 || !key.bytes().all(|b| b.is_ascii_graphic()) {
            let message = format!("the {} header must be 1 to 253 visible ASCII characters", self.sticky_header);
            return Err(Refused::new(StatusCode::BAD_REQUEST, "bad_sticky_key", message));
        }
        Ok(Some(key.to_string()))
    }

    fn known(&self, name: String) -> Result<String, Refused> {
        if self.tiers.contains_key(&name) { Ok(name) } else { Err(unknown_tier()) }
    }
}

/// The router's recent picks, by sticky key (or client address) and tier.
#[derive(Default)]
pub struct Picks(Mutex<HashMap<(String, String), (RouteAnswer, Instant)>>);

impl Picks {
    /// A pick for `key` and `tier` made less than [`PICK_REUSE`] ago.
    pub fn get(&self, key: &str, tier: &str, now: Instant) -> Option<RouteAnswer> {
        let picks = self.0.lock().ok()?;
        let (pick, at) = picks.get(&(key.to_string(), tier.to_string()))?;
        (now.saturating_duration_since(*at) < PICK_REUSE).then(|| pick.clone())
    }

    pub fn put(&self, key: &str, tier: &str, pick: RouteAnswer, now: Instant) {
        if let Ok(mut picks) = self.0.lock() {
            if picks.len() >= MAX_PICKS {
                picks.retain(|_, (_, at)| now.saturating_duration_since(*at) < PICK_REUSE);
                if picks.len() >= MAX_PICKS {
                    picks.clear();
                }
            }
            picks.insert((key.to_string(), tier.to_string()), (pick, now));
        }
    }

    /// Forgets every pick of `backend`: it did not answer.
    pub fn forget_backend(&self, backend: &str) {
        if let Ok(mut picks) = self.0.lock() {
            picks.retain(|_, (pick, _)| pick.backend != backend);
        }
    }
}

fn unknown_tier() -> Refused {
    Refused::new(StatusCode::BAD_REQUEST, "unknown_tier", "the tier named is not one this gateway routes")
}

fn is_tier_name(name: &str) -> bool {
    (1..=63).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// A prefix is a plain path, without a trailing `/`, clear of the gateway's own paths.
fn check_prefix(prefix: &str) -> Result<(), String> {
    let plain = prefix.len() <= 128
        && prefix.len() > 1
        && prefix.starts_with('/')
        && !prefix.ends_with('/')
        && !prefix.contains("//")
        && prefix.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._~/".contains(&b))
        && !prefix.split('/').any(|segment| segment == "." || segment == "..");
    if !plain {
        return Err(format!(
            "routed path {prefix:?} must start with '/', not end with one, and be at most 128 of A-Z, a-z, 0-9, '-', '.', '_', '~' and '/'"
        ));
    }
    let clashes = RESERVED.iter().any(|own| {
        let under = |a: &str, b: &str| a == b || a.starts_with(&format!("{b}/"));
        under(prefix, own) || under(own, prefix)
    });
    if clashes {
        return Err(format!("routed path {prefix} overlaps the gateway's own paths ({})", RESERVED.join(", ")));
    }
    Ok(())
}

/// The backend's URI for the request: its address (with `default_port`
/// when it names none) and the request's own path and query.
pub fn backend_uri(address: &str, default_port: u16, path_and_query: &str) -> Option<Uri> {
    // Only a host and port: nothing of the address may become user info or path.
    if address.is_empty() || !address.bytes().all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b)) {
        return None;
    }
    let authority = if let Ok(v6) = address.parse::<Ipv6Addr>() {
        format!("[{v6}]:{default_port}")
    } else if address.starts_with('[') {
        if address.contains("]:") { address.to_string() } else { format!("{address}:{default_port}") }
    } else if address.contains(':') {
        address.to_string()
    } else {
        format!("{address}:{default_port}")
    };
    let uri: Uri = format!("http://{authority}{path_and_query}").parse().ok()?;
    (uri.authority().map(|a| a.as_str()) == Some(authority.as_str())).then_some(uri)
}

/// `ANY <routed prefix>/...`: the request goes to the backend the router picks.
pub async fn forward(State(gateway): State<Arc<Gateway>>, request: Request<Body>) -> Response<Body> {
    match route_and_forward(&gateway, request).await {
        Ok(response) => {
            gateway.metrics.requests.with_label_values(&[ROUTE, response.status().as_str()]).inc();
            response
        }
        Err(refused) => reply::refuse(&gateway.metrics, ROUTE, refused),
    }
}

async fn route_and_forward(gateway: &Arc<Gateway>, mut request: Request<Body>) -> Result<Response<Body>, Refused> {
    let routes = gateway.settings.routes.as_ref().ok_or_else(internal)?;
    let client = gateway.client_address(&request)?;
    if !crate::client::allowed(client, &gateway.settings.anonymous_allow) {
        let message = "this address may not use the gateway's routed paths";
        return Err(Refused::new(StatusCode::FORBIDDEN, "not_allowlisted", message));
    }
    let mut named = routes.named_tier(request.headers(), request.uri().query())?;
    let sticky_key = routes.sticky_key(request.headers())?;
    if named.is_none() && routes.tier_field.is_some() && is_json(request.headers()) {
        // The tier may be in the body: read it (small, and whole within the
        // deadline), then send it on as it was.
        let (parts, body) = request.into_parts();
        let bytes = crate::api::read_body(body, gateway.settings.body_deadline, MAX_TIER_BODY_BYTES).await?;
        named = routes.tier_in_body(&bytes)?;
        request = Request::from_parts(parts, Body::from(bytes));
    }
    let (tier_name, tier) = routes.or_default(named)?;
    let key = sticky_key.clone().unwrap_or_else(|| client.to_string());
    let picked = match gateway.picks.get(&key, &tier_name, Instant::now()) {
        Some(picked) => picked,
        None => {
            let asked = RouteRequest {
                tier,
                client_address: Some(client.to_string()),
                coordinates: None,
                sticky_key,
                weights: None,
            };
            let picked = pick(gateway, &asked, &tier_name).await?;
            gateway.picks.put(&key, &tier_name, picked.clone(), Instant::now());
            picked
        }
    };
    let address = picked.address.as_deref().ok_or_else(|| {
        tracing::warn!(backend = %picked.backend, "the router picked a backend without an address");
        Refused::new(StatusCode::SERVICE_UNAVAILABLE, "no_backend", "no backend can take this request now")
            .retry_after(1)
    })?;
    let path_and_query = request.uri().path_and_query().map_or("/", |p| p.as_str()).to_string();
    let uri = backend_uri(address, routes.backend_port, &path_and_query).ok_or_else(internal)?;

    let upgrade = proxy::wants_upgrade(request.headers());
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut request));
    let (parts, body) = request.into_parts();
    let mut headers = proxy::forwarded_headers(&parts.headers, upgrade);
    // The backend's own credentials are the client's business, not the gateway's.
    if let Some(authorization) = parts.headers.get(header::AUTHORIZATION) {
        headers.insert(header::AUTHORIZATION, authorization.clone());
    }
    headers.insert(
        HeaderName::from_static("x-forwarded-for"),
        HeaderValue::try_from(client.to_string()).map_err(|_| internal())?,
    );
    let to_backend = gateway.metrics.proxied_bytes.with_label_values(&["to_backend"]);
    let body_ended = Arc::new(AtomicBool::new(false));
    let mut upstream = Request::builder()
        .method(parts.method)
        .uri(uri)
        .body(Counted::new(body, to_backend.clone(), None).telling(body_ended.clone()))
        .map_err(|_| internal())?;
    *upstream.headers_mut() = headers;

    let response = tokio::time::timeout(proxy::RESPONSE_HEAD_TIMEOUT, gateway.pods.request(upstream))
        .await
        .map_err(|_| unreachable_backend("backend_timeout"))?
        .map_err(|e| {
            if proxy::caused_by_slow_body(&e) {
                return Refused::new(StatusCode::REQUEST_TIMEOUT, "slow_body", "the request body came too slowly")
                    .already_counted();
            }
            tracing::debug!(error = %e, backend = %picked.backend, "the backend did not answer");
            gateway.picks.forget_backend(&picked.backend);
            unreachable_backend("backend_unreachable")
        })?;
    let from_backend = gateway.metrics.proxied_bytes.with_label_values(&["from_backend"]);
    let backend = HeaderValue::try_from(picked.backend.as_str()).map_err(|_| internal())?;
    let mut answer = if let Some(client_upgrade) = client_upgrade
        && response.status() == StatusCode::SWITCHING_PROTOCOLS
    {
        proxy::join_upgraded(client_upgrade, response, to_backend, from_backend, None)
    } else {
        let ended = body_ended.load(std::sync::atomic::Ordering::Relaxed);
        let (parts, body) = response.into_parts();
        let mut answer = Response::new(Body::new(Counted::new(body, from_backend, None)));
        *answer.status_mut() = parts.status;
        *answer.headers_mut() = proxy::answer_headers(&parts.headers, ended);
        answer
    };
    answer.headers_mut().insert(BACKEND, backend);
    Ok(answer)
}

/// The backend the operator's router picks for `asked`.
async fn pick(gateway: &Gateway, asked: &RouteRequest, tier_name: &str) -> Result<RouteAnswer, Refused> {
    let body = Bytes::from(serde_json::to_vec(asked).map_err(|_| internal())?);
    let answer = gateway.operator.as_gateway(Method::POST, ROUTE_PATH, body).await.map_err(|e| {
        tracing::warn!(error = %e, "the operator's router did not answer");
        router_unavailable()
    })?;
    match answer.status {
        StatusCode::OK => serde_json::from_slice(&answer.body).map_err(|e| {
            tracing::warn!(error = %e, "the router's answer is not a route");
            router_unavailable()
        }),
        // No backend has room (or the operator's leader is changing).
        StatusCode::SERVICE_UNAVAILABLE => {
            let message = format!("no backend has room for tier {tier_name} now");
            Err(Refused::new(StatusCode::SERVICE_UNAVAILABLE, "no_backend", message).retry_after(1))
        }
        status => {
            tracing::warn!(%status, "the operator's router refused the gateway");
            Err(router_unavailable())
        }
    }
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|media| media.trim().eq_ignore_ascii_case("application/json"))
}

fn router_unavailable() -> Refused {
    Refused::new(StatusCode::SERVICE_UNAVAILABLE, "router_unavailable", "requests cannot be routed now").retry_after(5)
}

fn unreachable_backend(reason: &'static str) -> Refused {
    Refused::new(StatusCode::BAD_GATEWAY, reason, "the backend did not answer").retry_after(1)
}

fn internal() -> Refused {
    Refused::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "the request could not be forwarded")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags<'a>(prefixes: &'a [String], tiers: &'a str) -> RouteFlags<'a> {
        RouteFlags {
            prefixes,
            tiers_json: tiers,
            default_tier: None,
            tier_header: "x-tidepool-tier",
            tier_query: "tier",
            tier_field: "tier",
            sticky_header: "x-tidepool-sticky",
            backend_port: 80,
        }
    }

    const TIERS: &str = r#"{"small": {"vcpu": 1, "memoryMiB": 512}, "gpu": {"vcpu": 4, "memoryMiB": 8192, "gpus": 1}}"#;

    fn routes() -> Routes {
        Routes::parse(&flags(&["/app".to_string()], TIERS)).unwrap().unwrap()
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(HeaderName::try_from(*name).unwrap(), HeaderValue::try_from(*value).unwrap());
        }
        map
    }

    #[test]
    fn no_prefix_means_nothing_is_routed() {
        assert!(Routes::parse(&flags(&[" ".to_string()], "{}")).unwrap().is_none());
    }

    #[test]
    fn prefixes_tiers_and_names_are_checked_at_start() {
        let bad = |prefix: &str, tiers: &str| Routes::parse(&flags(&[prefix.to_string()], tiers)).unwrap_err();
        for prefix in
            ["app", "/", "/app/", "/a//b", "/a/../b", "/a b", "/a{x}", "/api", "/api/x", "/s", "/s/x", "/assets"]
        {
            bad(prefix, TIERS);
        }
        // A prefix above the gateway's own paths would shadow them too.
        assert!(bad("/s", TIERS).contains("overlaps"));
        assert!(Routes::parse(&flags(&["/session".to_string()], TIERS)).is_ok());
        assert!(bad("/app", "{}").contains("at least one tier"));
        assert!(bad("/app", "[1]").contains("JSON map"));
        assert!(bad("/app", r#"{"Big": {"vcpu": 1, "memoryMiB": 64}}"#).contains("tier name"));
        assert!(bad("/app", r#"{"big": {"vcpu": 0, "memoryMiB": 64}}"#).contains("tier big"));
        let app = ["/app".to_string()];
        let mut with_default = flags(&app, TIERS);
        with_default.default_tier = Some("huge");
        assert!(Routes::parse(&with_default).unwrap_err().contains("default tier"));
        let mut bad_query = flags(&app, TIERS);
        bad_query.tier_query = "a&b";
        assert!(Routes::parse(&bad_query).is_err());
        let mut bad_header = flags(&app, TIERS);
        bad_header.sticky_header = "not a header";
        assert!(Routes::parse(&bad_header).is_err());
    }

    #[test]
    fn the_tier_comes_from_the_header_then_the_query() {
        let routes = routes();
        let named = |h: &[(&str, &str)], q: Option<&str>| routes.named_tier(&headers(h), q);
        assert_eq!(named(&[("x-tidepool-tier", "gpu")], Some("tier=small")).unwrap().as_deref(), Some("gpu"));
        assert_eq!(named(&[], Some("a=1&tier=small")).unwrap().as_deref(), Some("small"));
        assert_eq!(named(&[], Some("a=1")).unwrap(), None);
        assert_eq!(named(&[], None).unwrap(), None);
        assert_eq!(named(&[("x-tidepool-tier", "huge")], None).unwrap_err().reason, "unknown_tier");
        assert_eq!(named(&[], Some("tier=huge")).unwrap_err().reason, "unknown_tier");
    }

    #[test]
    fn the_tier_may_be_a_field_of_a_json_body() {
        let routes = routes();
        assert_eq!(routes.tier_in_body(br#"{"tier": "small", "x": 1}"#).unwrap().as_deref(), Some("small"));
        assert_eq!(routes.tier_in_body(br#"{"x": 1}"#).unwrap(), None);
        // Not JSON, or not an object: the body names nothing.
        assert_eq!(routes.tier_in_body(b"tier=small").unwrap(), None);
        assert_eq!(routes.tier_in_body(br#"["small"]"#).unwrap(), None);
        assert_eq!(routes.tier_in_body(br#"{"tier": 3}"#).unwrap_err().reason, "unknown_tier");
        assert_eq!(routes.tier_in_body(br#"{"tier": "huge"}"#).unwrap_err().reason, "unknown_tier");
        let mut unread = routes.clone();
        unread.tier_field = None;
        assert_eq!(unread.tier_in_body(br#"{"tier": "small"}"#).unwrap(), None);
    }

    #[test]
    fn a_request_naming_no_tier_gets_the_default_or_is_refused() {
        let mut routes = routes();
        assert_eq!(routes.or_default(None).unwrap_err().reason, "no_tier");
        assert_eq!(routes.or_default(Some("gpu".into())).unwrap().1.gpus, 1);
        routes.default_tier = Some("small".into());
        let (name, tier) = routes.or_default(None).unwrap();
        assert_eq!((name.as_str(), tier.memory_mib), ("small", 512));
    }

    #[test]
    fn sticky_keys_are_short_visible_text() {
        let routes = routes();
        let key = |value: &str| routes.sticky_key(&headers(&[("x-tidepool-sticky", value)]));
        assert_eq!(key(" user-7 ").unwrap().as_deref(), Some("user-7"));
        assert_eq!(routes.sticky_key(&HeaderMap::new()).unwrap(), None);
        assert_eq!(key("").unwrap_err().reason, "bad_sticky_key");
        assert_eq!(key("a b").unwrap_err().reason, "bad_sticky_key");
        assert_eq!(key(&"k".repeat(254)).unwrap_err().reason, "bad_sticky_key");
    }

    #[test]
    fn the_backends_uri_is_its_address_and_the_requests_path() {
        let uri = |address: &str| backend_uri(address, 8080, "/app/x?y=1").map(|u| u.to_string());
        assert_eq!(uri("10.0.0.5").as_deref(), Some("http://10.0.0.5:8080/app/x?y=1"));
        assert_eq!(uri("10.0.0.5:9000").as_deref(), Some("http://10.0.0.5:9000/app/x?y=1"));
        assert_eq!(uri("edge.example").as_deref(), Some("http://edge.example:8080/app/x?y=1"));
        assert_eq!(uri("fd00::1").as_deref(), Some("http://[fd00::1]:8080/app/x?y=1"));
        assert_eq!(uri("[fd00::1]").as_deref(), Some("http://[fd00::1]:8080/app/x?y=1"));
        assert_eq!(uri("[fd00::1]:9000").as_deref(), Some("http://[fd00::1]:9000/app/x?y=1"));
        // An address that is more than a host and port is not used.
        for bad in ["evil.example/x", "user@evil.example", "a b"] {
            assert_eq!(uri(bad), None, "{bad}");
        }
    }

    fn answer(backend: &str) -> RouteAnswer {
        serde_json::from_value(serde_json::json!({
            "backend": backend, "kind": "external", "address": "10.0.0.1:80", "score": 1.0,
            "sticky": false, "reportAgeMs": 0, "sampleAgeMs": 0
        }))
        .unwrap()
    }

    #[test]
    fn a_pick_is_reused_for_its_key_and_tier_for_a_second_and_forgotten_with_its_backend() {
        let picks = Picks::default();
        let start = Instant::now();
        picks.put("alice", "small", answer("a"), start);
        picks.put("bob", "small", answer("b"), start);
        assert_eq!(picks.get("alice", "small", start + Duration::from_millis(999)).unwrap().backend, "a");
        // Another tier, or a second later, asks the router again.
        assert!(picks.get("alice", "large", start).is_none());
        assert!(picks.get("alice", "small", start + PICK_REUSE).is_none());
        // A backend that did not answer loses its picks; others keep theirs.
        picks.forget_backend("a");
        assert!(picks.get("alice", "small", start).is_none());
        assert_eq!(picks.get("bob", "small", start).unwrap().backend, "b");
    }

    #[test]
    fn the_picks_stay_bounded() {
        let picks = Picks::default();
        let start = Instant::now();
        for i in 0..MAX_PICKS {
            picks.put(&format!("k{i}"), "small", answer("a"), start);
        }
        // Full of fresh picks: it starts again.
        picks.put("one-more", "small", answer("a"), start);
        assert_eq!(picks.0.lock().unwrap().len(), 1);
        // Full of stale ones: only they go.
        let picks = Picks::default();
        for i in 0..MAX_PICKS {
            picks.put(&format!("k{i}"), "small", answer("a"), start);
        }
        let later = start + PICK_REUSE;
        picks.put("fresh", "small", answer("a"), later);
        assert_eq!(picks.0.lock().unwrap().len(), 1);
        assert!(picks.get("fresh", "small", later).is_some());
    }

    #[test]
    fn only_json_bodies_are_read_for_the_tier() {
        assert!(is_json(&headers(&[("content-type", "application/json; charset=utf-8")])));
        assert!(!is_json(&headers(&[("content-type", "text/plain")])));
        assert!(!is_json(&HeaderMap::new()));
    }
}
