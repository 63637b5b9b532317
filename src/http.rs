//! The side HTTP port: `/healthz`, `/readyz`, `/metrics`, and a read-only `/search` (the
//! embedded index belongs to the daemon's process, so `cdc-indexer search` asks here).

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
    /// Set once the embedder and sink are up.
    pub search: SearchParts,
}

/// Seconds without a pipeline heartbeat after which `/healthz` fails.
const MAX_SILENCE_S: i64 = 60;

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/search", get(search))
        .with_state(state)
}

/// Serves until `cancel`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(async move { cancel.cancelled().await })
        .await
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

async fn search(State(s): State<AppState>, Query(q): Query<SearchQuery>) -> Response {
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
