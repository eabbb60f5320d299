//! `GET /api/v1/results`: stored results of ended sessions, read back from
//! the results store. A caller who may list TestSessions in a namespace may
//! read its stored results.

use std::sync::Arc;

use axum::Extension;
use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use k8s_openapi::jiff::Timestamp;
use tidepool_protocol::stored::ResultsQuery;

use super::access::{Ask, Caller};
use super::reply::Refused;
use super::sessions::check_names;
use super::state::ApiState;
use super::{deny, refuse};
use crate::export::history;

pub async fn list(
    State(state): State<Arc<ApiState>>,
    Extension(caller): Extension<Caller>,
    query: Result<Query<ResultsQuery>, QueryRejection>,
) -> Response {
    let query = match query {
        Ok(Query(query)) => query,
        Err(e) => {
            let refused = Refused::new(StatusCode::BAD_REQUEST, "bad_query", e.body_text());
            return refuse(&state, "stored_results", refused);
        }
    };
    let namespace = query.namespace.clone().unwrap_or_else(|| state.namespace.clone());
    let pool = query.pool.as_deref().map(|pool| ("WarmPool", pool));
    if let Err(refused) = check_names(&state, &namespace, pool) {
        return refuse(&state, "stored_results", refused);
    }
    let ask = Ask::Sessions { verb: "list", namespace: &namespace, name: None };
    if let Err(denied) = state.access.authorize(&caller, ask).await {
        return deny(&state, "stored_results", &denied);
    }
    let Some(exporter) = state.exporter.as_deref() else {
        let message =
            "no results store is configured: ended sessions keep their results only until their retention ends";
        return refuse(&state, "stored_results", Refused::new(StatusCode::NOT_FOUND, "no_store", message));
    };
    let plan = match history::plan(&query, namespace, Timestamp::now()) {
        Ok(plan) => plan,
        Err(message) => {
            return refuse(
                &state,
                "stored_results",
                Refused::new(StatusCode::UNPROCESSABLE_ENTITY, "bad_query", message),
            );
        }
    };
    match history::read(exporter, &plan).await {
        Ok(page) => {
            state.metrics.api_requests.with_label_values(&["stored_results", "200"]).inc();
            Json(page).into_response()
        }
        Err(e) => {
            // The store's own words stay in the log: they name hosts and buckets.
            tracing::warn!(error = %e, "reading stored results failed");
            let message = "the results store is not answering; try again later";
            refuse(
                &state,
                "stored_results",
                Refused::new(StatusCode::SERVICE_UNAVAILABLE, "store_unavailable", message),
            )
        }
    }
}
