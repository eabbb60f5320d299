//! `GET /api/v1/cluster?namespace=`: the operators' live view (pools,
//! sessions, tubes, backends) as server-sent events. The view is built from this
//! replica's watch caches and the agents' latest reports, never by asking
//! the API server, and sent whenever it changed, so a browser follows the
//! cluster without polling it. A caller who may list TestSessions in the
//! namespace and read Backends may watch it; the tubes are in it only for
//! a caller who may also list Tubes there (their targets name hosts inside
//! the cluster).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Extension;
use axum::body::Body;
use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::Response;
use kube::core::object::{HasSpec, HasStatus};
use kube::{Resource, ResourceExt};
use tidepool_crds::backend::{BackendKind, Health};
use tidepool_protocol::api::NamespaceQuery;
use tidepool_protocol::cluster::{BackendRow, ClusterView, Parts, event, pool_row, session_rows, tube_rows};

use super::access::{Ask, Caller, Denied};
use super::reply::Refused;
use super::sessions::check_names;
use super::state::ApiState;
use super::{deny, refuse};

use crate::placement::view::BackendView;

/// Views streaming at once, over all callers: each costs a snapshot of the
/// caches a second.
pub const MAX_STREAMS: usize = 32;
/// How often the caches are looked at for a change.
const TICK: Duration = Duration::from_secs(1);
/// A comment line this often while nothing changes, so proxies and the
/// server's idle timeout see a live stream.
const KEEP_ALIVE: Duration = Duration::from_secs(15);
/// A stream ends after this long; the browser reconnects. Bounds how long a
/// caller whose rights were taken away keeps watching.
const MAX_STREAM: Duration = Duration::from_secs(600);
const ROUTE: &str = "cluster";

pub async fn events(
    State(state): State<Arc<ApiState>>,
    Extension(caller): Extension<Caller>,
    query: Result<Query<NamespaceQuery>, QueryRejection>,
) -> Response {
    let namespace = match query {
        Ok(Query(query)) => query.namespace.unwrap_or_else(|| state.namespace.clone()),
        Err(e) => return refuse(&state, ROUTE, Refused::new(StatusCode::BAD_REQUEST, "bad_query", e.body_text())),
    };
    if let Err(refused) = check_names(&state, &namespace, None) {
        return refuse(&state, ROUTE, refused);
    }
    for ask in [Ask::Sessions { verb: "list", namespace: &namespace, name: None }, Ask::Route] {
        if let Err(denied) = state.access.authorize(&caller, ask).await {
            return deny(&state, ROUTE, &denied);
        }
    }
    let ask = Ask::Tubes { verb: "list", namespace: &namespace, name: None };
    let show_tubes = match state.access.authorize(&caller, ask).await {
        Ok(()) => true,
        Err(Denied::Forbidden(_)) => false,
        Err(denied) => return deny(&state, ROUTE, &denied),
    };
    let Ok(permit) = state.cluster_streams.clone().try_acquire_owned() else {
        state.metrics.api_refusals.with_label_values(&[ROUTE, "streams"]).inc();
        return super::reply::retry_later(StatusCode::TOO_MANY_REQUESTS, "too many cluster views are open", 10);
    };
    state.metrics.api_requests.with_label_values(&[ROUTE, "200"]).inc();
    let started = Instant::now();
    let stream = futures::stream::unfold(
        (state, namespace, None::<ClusterView>, Instant::now(), permit),
        move |(state, namespace, last, mut last_sent, permit)| async move {
            loop {
                if started.elapsed() >= MAX_STREAM {
                    return None;
                }
                let view = snapshot(&state, &namespace, show_tubes);
                let changed = last.as_ref() != Some(&view);
                if changed {
                    let chunk = Bytes::from(event(&view));
                    return Some((Ok::<_, Infallible>(chunk), (state, namespace, Some(view), Instant::now(), permit)));
                }
                if last_sent.elapsed() >= KEEP_ALIVE {
                    last_sent = Instant::now();
                    return Some((
                        Ok(Bytes::from_static(b": nothing changed\n\n")),
                        (state, namespace, last, last_sent, permit),
                    ));
                }
                tokio::time::sleep(TICK).await;
            }
        },
    );
    let mut response = Response::new(Body::from_stream(stream));
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // Proxies in front must pass events on as they come.
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

/// The view as the caches show it now, with the tubes when `show_tubes`.
fn snapshot(state: &ApiState, namespace: &str, show_tubes: bool) -> ClusterView {
    let mut pools: Vec<_> = state
        .pools
        .state()
        .iter()
        .filter(|p| p.namespace().as_deref() == Some(namespace))
        .map(|p| pool_row(&p.name_any(), &p.spec, p.status.as_ref()))
        .collect();
    pools.sort_by(|a, b| a.name.cmp(&b.name));
    let sessions: Vec<_> =
        state.sessions.state().into_iter().filter(|s| s.namespace().as_deref() == Some(namespace)).collect();
    let names: Vec<String> = sessions.iter().map(|s| s.name_any()).collect();
    let parts = parts_of(&sessions, &names);
    let now_unix = k8s_openapi::jiff::Timestamp::now().as_second();
    let tubes: Vec<_> = if show_tubes {
        state.tubes.state().into_iter().filter(|t| t.namespace().as_deref() == Some(namespace)).collect()
    } else {
        Vec::new()
    };
    let tube_names: Vec<String> = tubes.iter().map(|t| t.name_any()).collect();
    let tube_parts = parts_of(&tubes, &tube_names);
    let now = Instant::now();
    let mut backends: Vec<BackendRow> = state.fleet.with_router(|router| {
        state
            .backends
            .state()
            .iter()
            .map(|backend| {
                let name = backend.name_any();
                let view = router.view(&name);
                let fresh = view.is_some_and(|v| router.is_fresh(v, now));
                let health = backend.status.as_ref().map_or(Health::Unknown, |s| s.health);
                backend_row(&name, backend.spec.kind, backend.spec.region.clone(), health, view, fresh)
            })
            .collect()
    });
    backends.sort_by(|a, b| a.name.cmp(&b.name));
    ClusterView {
        namespace: namespace.to_string(),
        pools,
        sessions_total: sessions.len(),
        sessions: session_rows(&parts, now_unix),
        tubes: show_tubes.then(|| tube_rows(&tube_parts, now_unix)),
        tubes_total: tubes.len(),
        backends,
    }
}

/// What rows are made of, from cached objects and their names.
fn parts_of<'a, K>(objects: &'a [Arc<K>], names: &'a [String]) -> Vec<Parts<'a, K::Spec, K::Status>>
where
    K: HasSpec + HasStatus + Resource,
{
    objects
        .iter()
        .zip(names)
        .map(|(object, name)| Parts {
            name,
            created_unix: object.meta().creation_timestamp.as_ref().map(|at| at.0.as_second()),
            spec: object.spec(),
            status: object.status(),
        })
        .collect()
}

/// A backend's row: its registration, and its agent's latest report when one came.
fn backend_row(
    name: &str,
    kind: BackendKind,
    region: Option<String>,
    health: Health,
    view: Option<&BackendView>,
    fresh: bool,
) -> BackendRow {
    let kind = match kind {
        BackendKind::Node => "Node",
        BackendKind::External => "External",
    };
    let health = match health {
        Health::Unknown => "Unknown",
        Health::Healthy => "Healthy",
        Health::Unhealthy => "Unhealthy",
    };
    let Some(view) = view else {
        return BackendRow {
            name: name.to_string(),
            kind: kind.to_string(),
            region,
            health: health.to_string(),
            stale: true,
            ..BackendRow::default()
        };
    };
    let gpus = view.report.capacity.gpus.len() as u32;
    let memory_used_percent = (view.memory_total > 0)
        .then(|| 100.0 * view.memory_total.saturating_sub(view.memory_free) as f32 / view.memory_total as f32);
    BackendRow {
        name: name.to_string(),
        kind: kind.to_string(),
        region: view.region.clone().or(region),
        // Round to whole percents: finer changes are noise, and each would send a new view.
        core_percent: view.cores_by_load.iter().rev().map(|p| p.round()).collect(),
        memory_used_percent: memory_used_percent.map(f32::round),
        gpu_percent: (gpus > 0).then_some(view.gpu_percent.round()),
        gpus,
        health: health.to_string(),
        stale: !fresh,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::view::Probes;
    use tidepool_wire::report::{AgentReport, Capacity, Gpu, GpuWindow, ReportKind, Window};

    fn view(gpus: usize) -> BackendView {
        let memory = 100 << 30;
        let mut report = AgentReport::new(
            "node-a",
            ReportKind::Node,
            Capacity {
                cores: 3,
                memory_bytes: memory,
                disk_bytes: 1 << 40,
                gpus: (0..gpus).map(|i| Gpu { index: i as u32, model: "T4".into(), memory_bytes: 16 << 30 }).collect(),
            },
            vec![Window {
                seconds: 10,
                samples: 10,
                cores: vec![10.2, 95.6, 40.0],
                memory_used_bytes: memory / 4,
                gpus: (0..gpus)
                    .map(|i| GpuWindow { utilization_percent: 30.0 + 20.0 * i as f32, ..Default::default() })
                    .collect(),
                ..Window::default()
            }],
        );
        report.region = Some("eu-west".into());
        BackendView::from_report(report, Instant::now(), Probes::default())
    }

    #[test]
    fn a_reporting_backend_shows_its_cores_busiest_first_memory_and_gpus() {
        let row = backend_row("node-a", BackendKind::Node, None, Health::Healthy, Some(&view(2)), true);
        assert_eq!(row.core_percent, [96.0, 40.0, 10.0]);
        assert_eq!(row.memory_used_percent, Some(25.0));
        assert_eq!((row.gpus, row.gpu_percent), (2, Some(40.0)));
        assert_eq!(
            (row.kind.as_str(), row.health.as_str(), row.region.as_deref()),
            ("Node", "Healthy", Some("eu-west"))
        );
        assert!(!row.stale);
    }

    #[test]
    fn a_backend_without_gpus_shows_no_gpu_use_and_a_late_one_is_stale() {
        let row = backend_row("node-a", BackendKind::Node, None, Health::Unhealthy, Some(&view(0)), false);
        assert_eq!((row.gpus, row.gpu_percent, row.stale), (0, None, true));
        assert_eq!(row.health, "Unhealthy");
    }

    #[test]
    fn a_backend_that_never_reported_is_stale_with_no_figures() {
        let row = backend_row("edge-1", BackendKind::External, Some("us-east".into()), Health::Unknown, None, false);
        assert_eq!(row.kind, "External");
        assert_eq!(row.region.as_deref(), Some("us-east"));
        assert!(row.stale && row.core_percent.is_empty() && row.memory_used_percent.is_none());
    }
}
