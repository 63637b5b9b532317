//! The side HTTP port: `/healthz`, `/readyz`, `/metrics` (probes and Prometheus, often on
//! the pod IP); and, only when `http.search_listen` is set, a search port of its own with a
//! read-only `/search`, and the read-only `/index/states` and `/index/scan` that
//! `cdc-indexer reconcile` reads the index through (the embedded index belongs to the
//! daemon's process, so `search` and `reconcile` ask there; see `reconcile::remote`). These
//! answer with row payloads (and search competes with the pipeline for the embedder), so the
//! port is off by default and can require a bearer token.

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
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

/// The search port: `/search`, and the index reads of `reconcile`.
pub fn search_router(state: SearchState) -> Router {
    Router::new()
        .route("/search", get(search))
        .route("/index/states", post(index_states))
        .route("/index/scan", post(index_scan))
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

fn unauthorized() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        [(axum::http::header::WWW_AUTHENTICATE, "Bearer")],
        Json(json!({"error": "missing or wrong bearer token (http.search_token_env / search_token_file)"})),
    )
        .into_response()
}

async fn search(
    State(s): State<SearchState>,
    headers: axum::http::HeaderMap,
    Query(q): Query<SearchQuery>,
) -> Response {
    if !authorized(&headers, s.token.as_deref()) {
        return unauthorized();
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

fn index_of(s: &SearchState) -> Option<Arc<dyn Sink>> {
    s.search.get().map(|(_, sink)| sink.clone())
}

fn starting_up() -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(json!({"error": "starting up"})),
    )
        .into_response()
}

fn index_error(e: crate::error::StageError) -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(json!({"error": e.to_string()})),
    )
        .into_response()
}

fn bad_request(what: &str) -> Response {
    (StatusCode::BAD_REQUEST, Json(json!({"error": what}))).into_response()
}

/// Chunk 0 of each key (`reconcile` through the daemon).
async fn index_states(
    State(s): State<SearchState>,
    headers: axum::http::HeaderMap,
    Json(body): Json<serde_json::Value>,
) -> Response {
    if !authorized(&headers, s.token.as_deref()) {
        return unauthorized();
    }
    let Some(keys) = crate::reconcile::remote::keys_of(&body) else {
        return bad_request("expected {\"keys\": [{\"table\", \"key\"}]}");
    };
    if keys.is_empty() {
        return Json(json!({"states": []})).into_response();
    }
    let Some(sink) = index_of(&s) else {
        return starting_up();
    };
    match sink.read_states(&keys).await {
        Ok(states) => {
            let states: Vec<serde_json::Value> = states
                .into_iter()
                .map(|(k, st)| json!({"table": k.table, "key": k.key, "payload": st.payload}))
                .collect();
            Json(json!({ "states": states })).into_response()
        }
        Err(e) => index_error(e),
    }
}

/// One page of a scan (`reconcile` through the daemon).
async fn index_scan(
    State(s): State<SearchState>,
    headers: axum::http::HeaderMap,
    Json(body): Json<serde_json::Value>,
) -> Response {
    if !authorized(&headers, s.token.as_deref()) {
        return unauthorized();
    }
    let Some(sink) = index_of(&s) else {
        return starting_up();
    };
    let after = body.get("after").and_then(serde_json::Value::as_str);
    let limit = body
        .get("limit")
        .and_then(serde_json::Value::as_u64)
        .unwrap_or(256)
        .clamp(1, 10_000) as usize;
    let keys = crate::reconcile::remote::keys_of(&body);
    let scope = match (body.get("table").and_then(serde_json::Value::as_str), &keys) {
        (Some(t), None) => crate::sink::ScanScope::Table(t),
        (None, Some(k)) => crate::sink::ScanScope::Keys(k),
        _ => {
            return bad_request("expected {\"table\"} or {\"keys\"}, with \"after\" and \"limit\"");
        }
    };
    match sink.scan(scope, after, limit).await {
        Ok(page) => Json(json!({
            "points": page.points.iter().map(crate::reconcile::remote::point_json).collect::<Vec<_>>(),
            "next": page.next,
        }))
        .into_response(),
        Err(e) => index_error(e),
    }
}
