//! The side HTTP port: `/healthz`, `/readyz`, `/metrics` (probes and Prometheus, often on
//! the pod IP); and, only when `http.search_listen` is set, a search port of its own with a
//! read-only `/search` (the embedded index belongs to the daemon's process, so
//! `cdc-indexer search` asks there). Search answers with row payloads and competes with the
//! pipeline for the embedder, so it is off by default and can require a bearer token.

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Deserialize;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::embed::Embedder;
use crate::metrics::Metrics;
use crate::sink::Sink;

/// The embedder and sink `/search` uses, set once both are up.
pub type SearchParts = Arc<tokio::sync::OnceCell<(Arc<dyn Embedder>, Arc<dyn Sink>)>>;

#[derive(Clone)]
pub struct AppState {
    pub metrics: Arc<Metrics>,
}

/// Seconds without a pipeline heartbeat after which `/healthz` fails.
const MAX_SILENCE_S: i64 = 60;

/// The side port: probes and metrics. No `/search` here.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

/// What the search port needs.
#[derive(Clone)]
pub struct SearchState {
    pub search: SearchParts,
    /// When set, `/search` requires `Authorization: Bearer <token>`.
    pub token: Option<Arc<str>>,
}

/// The search port: `/search` only.
pub fn search_router(state: SearchState) -> Router {
    Router::new()
        .route("/search", get(search))
        .with_state(state)
}

/// Serves `router` until `cancel`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(async move { cancel.cancelled().await })
        .await
}

/// Constant-time comparison of the presented bearer token with ours.
fn authorized(headers: &axum::http::HeaderMap, token: Option<&str>) -> bool {
    let Some(expected) = token else {
        return true;
    };
    let presented = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    let (a, b) = (presented.as_bytes(), expected.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn healthz(State(s): State<AppState>) -> Response {
    if s.metrics.health.alive(MAX_SILENCE_S) {
        (StatusCode::OK, "ok\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "pipeline loop stalled\n").into_response()
    }
}

async fn readyz(State(s): State<AppState>) -> Response {
    use std::sync::atomic::Ordering::Relaxed;
    let h = &s.metrics.health;
    let body = json!({
        "ready": h.ready(),
        "broker_connected": h.broker_connected.load(Relaxed),
        "consuming": h.consuming.load(Relaxed),
        "paused": h.paused.load(Relaxed),
        "sink_ok": h.sink_ok.load(Relaxed),
    });
    let status = if h.ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

async fn metrics(State(s): State<AppState>) -> Response {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.metrics.render(),
    )
        .into_response()
}

#[derive(Deserialize)]
struct SearchQuery {
    q: String,
    table: Option<String>,
    limit: Option<usize>,
}

async fn search(
    State(s): State<SearchState>,
    headers: axum::http::HeaderMap,
    Query(q): Query<SearchQuery>,
) -> Response {
    if !authorized(&headers, s.token.as_deref()) {
        return (
            StatusCode::UNAUTHORIZED,
            [(axum::http::header::WWW_AUTHENTICATE, "Bearer")],
            Json(json!({"error": "missing or wrong bearer token (http.search_token_env / search_token_file)"})),
        )
            .into_response();
    }
    let Some((embedder, sink)) = s.search.get() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"error": "starting up"})),
        )
            .into_response();
    };
    match crate::search::run(
        embedder.as_ref(),
        sink.as_ref(),
        &q.q,
        q.table.as_deref(),
        q.limit.unwrap_or(5).min(100),
    )
    .await
    {
        Ok(hits) => Json(json!({ "results": hits })).into_response(),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"error": e.to_string()})),
        )
            .into_response(),
    }
}
