//! The gateway's two listeners: the users' (the session API and the
//! streams) and the admin one (`/metrics`, `/healthz`, `/readyz`), each a
//! `tidepool-serve` server within the gateway's limits.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderValue, Method, Response, StatusCode, Uri, header};
use axum::routing::{any, get, post};
use kube::ResourceExt;
use tidepool_serve::Refusal;
use tokio::net::TcpListener;

use tidepool_protocol::api::{PublicPool, PublicPools};

use crate::reply::{self, Refused};
use crate::state::{Gateway, Peer};
use crate::{api, cluster, cors, proxy, routed};

/// The users' routes.
pub fn public_router(gateway: Arc<Gateway>) -> Router {
    let mut router = Router::new();
    for prefix in gateway.settings.routes.iter().flat_map(|r| &r.prefixes) {
        router = router.route(prefix, any(routed::forward)).route(&format!("{prefix}/{{*rest}}"), any(routed::forward));
    }
    router
        .route("/api/v1/pools", get(public_pools))
        .route(tidepool_protocol::cluster::CLUSTER_PATH, get(cluster::view))
        .route("/api/v1/sessions", post(api::create))
        .route("/api/v1/sessions/{name}", get(api::get).delete(api::delete))
        .route(proxy::PREFIX, any(proxy::stream))
        .route(&format!("{}/{{*rest}}", proxy::PREFIX), any(proxy::stream))
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(gateway.clone(), cross_origin))
        .layer(axum::middleware::map_response_with_state(gateway.clone(), security_headers))
        .with_state(gateway)
}

/// The admin routes: kept off the users' port.
pub fn admin_router(gateway: Arc<Gateway>, ready: Arc<AtomicBool>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || {
                let ready = ready.load(Ordering::Relaxed);
                async move {
                    if ready {
                        (StatusCode::OK, "ready")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "caches not synced")
                    }
                }
            }),
        )
        .route("/metrics", get(metrics))
        .with_state(gateway)
}

async fn metrics(State(gateway): State<Arc<Gateway>>) -> Response<Body> {
    let mut response = Response::new(Body::from(gateway.metrics.render()));
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4"));
    response
}

/// Anything not routed: a file of the web UI, if there is one by that path.
async fn not_found(State(gateway): State<Arc<Gateway>>, method: Method, uri: Uri) -> Response<Body> {
    let asset = (method == Method::GET || method == Method::HEAD)
        .then(|| gateway.ui.as_ref().and_then(|ui| ui.get(uri.path())))
        .flatten();
    let Some(asset) = asset else {
        return reply::refuse(
            &gateway.metrics,
            "other",
            Refused::new(StatusCode::NOT_FOUND, "not_found", "no such route"),
        );
    };
    let mut response =
        Response::new(if method == Method::HEAD { Body::empty() } else { Body::from(asset.body.clone()) });
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(asset.content_type));
    let caching = if asset.immutable { "public, max-age=31536000, immutable" } else { "no-cache" };
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static(caching));
    gateway.metrics.requests.with_label_values(&["ui", "200"]).inc();
    response
}

/// `GET /api/v1/pools`: the pools anyone may start a session on, for the
/// web UI's test. Private pools are never listed.
async fn public_pools(State(gateway): State<Arc<Gateway>>) -> Response<Body> {
    let pools = gateway
        .caches
        .public_pools()
        .iter()
        .map(|pool| PublicPool {
            namespace: pool.namespace().unwrap_or_default(),
            name: pool.name_any(),
            tier: pool.spec.tier.clone(),
            warm: pool.status.as_ref().map_or(0, |s| s.warm),
        })
        .collect();
    gateway.metrics.requests.with_label_values(&["pools", "200"]).inc();
    reply::json(StatusCode::OK, serde_json::to_vec(&PublicPools { pools }).unwrap_or_default())
}

/// Headers every answer carries: no sniffing, no framing, no referrer, only
/// this origin's scripts, no caching unless the answer says otherwise, and with TLS (here or in front), HTTPS only from now on.
async fn security_headers(State(gateway): State<Arc<Gateway>>, mut response: Response<Body>) -> Response<Body> {
    let headers = response.headers_mut();
    if gateway.settings.hsts {
        headers.insert(header::STRICT_TRANSPORT_SECURITY, HeaderValue::from_static("max-age=31536000"));
    }
    headers.insert("x-content-type-options", HeaderValue::from_static("nosniff"));
    headers.insert("x-frame-options", HeaderValue::from_static("DENY"));
    headers.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    headers.insert("content-security-policy", HeaderValue::from_static(crate::ui::CONTENT_SECURITY_POLICY));
    headers.entry(header::CACHE_CONTROL).or_insert(HeaderValue::from_static("no-store"));
    response
}

/// Cross-origin requests from listed origins: a preflight is answered here,
/// and the answer to the request itself names the origin. An unlisted
/// origin's preflight is refused; its other requests get no CORS headers,
/// so its page cannot read the answer.
async fn cross_origin(
    State(gateway): State<Arc<Gateway>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response<Body> {
    let origin = request.headers().get(header::ORIGIN).and_then(|o| o.to_str().ok()).map(str::to_string);
    let allowed = cors::allowed(origin.as_deref(), &gateway.settings.cors_origins).map(str::to_string);
    let preflight = request.method() == axum::http::Method::OPTIONS
        && request.headers().contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
    let mut response = if preflight {
        if allowed.is_none() {
            let refused = Refused::new(StatusCode::FORBIDDEN, "cors_origin", "this origin may not call the gateway");
            return reply::refuse(&gateway.metrics, "other", refused);
        }
        let mut response = Response::new(Body::empty());
        *response.status_mut() = StatusCode::NO_CONTENT;
        let headers = response.headers_mut();
        headers.insert(header::ACCESS_CONTROL_ALLOW_METHODS, HeaderValue::from_static(cors::ALLOW_METHODS));
        headers.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, HeaderValue::from_static(cors::ALLOW_HEADERS));
        headers.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static(cors::MAX_AGE_SECONDS));
        response
    } else {
        next.run(request).await
    };
    if let Some(origin) = allowed.and_then(|o| HeaderValue::try_from(o).ok()) {
        response.headers_mut().insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    }
    if !gateway.settings.cors_origins.is_empty() {
        response.headers_mut().append(header::VARY, HeaderValue::from_static("origin"));
    }
    response
}

/// Serves `router` on `listener` within the gateway's limits, counting
/// refusals and open connections, until `shutdown`.
pub async fn serve(
    gateway: Arc<Gateway>,
    listener: TcpListener,
    router: Router,
    tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let metrics = gateway.metrics.clone();
    let open = metrics.open_connections.clone();
    let server = tidepool_serve::Server::new(gateway.settings.limits)
        .tune_http1(|http| {
            http.max_buf_size(1 << 20).writev(true);
        })
        .on_connection(|_, peer| {
            let mut extensions = axum::http::Extensions::new();
            extensions.insert(Peer(peer));
            extensions
        })
        .on_open_change(move |change| open.add(change))
        .on_refusal(move |refusal: Refusal| metrics.refused(refusal.reason()));
    let server = match tls {
        Some(config) => server.tls(tokio_rustls::TlsAcceptor::from(config)),
        None => server,
    };
    server.serve(listener, router, shutdown).await;
}
