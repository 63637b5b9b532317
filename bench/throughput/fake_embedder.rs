//! A BENCHMARK INSTRUMENT, NOT AN EMBEDDING MODEL: an OpenAI-compatible `POST /v1/embeddings`
//! server that returns, for each input text, a deterministic unit vector of 384 values derived
//! from a SHA-256 hash of the text. No model runs; the vectors carry no meaning.
//!
//! It stands for an embedding service that costs nothing (a GPU-backed TEI/vLLM far from
//! saturation): with it, the daemon's throughput is its own ceiling (decode, plan, HTTP, index
//! writes, acks), not the model's. An optional fixed delay per request (`--fake-latency-ms`,
//! a sleep, no CPU) stands for a remote service's round trip, which `max_in_flight` is for.
//!
//! It runs on a runtime of its own (two threads), on a loopback port, inside the bench.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

pub const DIMENSIONS: usize = 384;

#[derive(Default)]
pub struct Served {
    pub requests: AtomicU64,
    pub texts: AtomicU64,
}

struct AppState {
    latency: Duration,
    served: Arc<Served>,
}

/// The running server; stopped when dropped.
pub struct FakeEmbedder {
    /// Base URL up to `/v1`, as `embedding.url` wants it.
    pub url: String,
    pub served: Arc<Served>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeEmbedder {
    pub fn start(latency: Duration) -> anyhow::Result<FakeEmbedder> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let url = format!("http://{}/v1", listener.local_addr()?);
        let served = Arc::new(Served::default());
        let state = Arc::new(AppState {
            latency,
            served: Arc::clone(&served),
        });
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("fake-embedder")
            .enable_all()
            .build()?;
        let thread = std::thread::spawn(move || {
            runtime.block_on(async move {
                let app = Router::new()
                    .route("/v1/embeddings", post(embeddings))
                    .with_state(state);
                let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                    return;
                };
                let _ = axum::serve(listener, app)
                    .with_graceful_shutdown(async {
                        let _ = rx.await;
                    })
                    .await;
            });
        });
        Ok(FakeEmbedder {
            url,
            served,
            shutdown: Some(tx),
            thread: Some(thread),
        })
    }
}

impl Drop for FakeEmbedder {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn error(status: StatusCode, message: &str) -> (StatusCode, Json<Value>) {
    (
        status,
        Json(
            json!({"error": {"message": message, "type": "invalid_request_error", "param": "input", "code": null}}),
        ),
    )
}

/// `{"input": "text" | ["text", ...], "model": ..., "dimensions"?: 384}` → OpenAI's answer.
async fn embeddings(
    State(state): State<Arc<AppState>>,
    Json(body): Json<Value>,
) -> (StatusCode, Json<Value>) {
    let texts: Vec<&str> = match &body["input"] {
        Value::String(s) => vec![s.as_str()],
        Value::Array(items) => match items.iter().map(Value::as_str).collect::<Option<_>>() {
            Some(texts) => texts,
            None => return error(StatusCode::BAD_REQUEST, "input: strings only"),
        },
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                "input: a string or a list of strings",
            );
        }
    };
    if texts.is_empty() || texts.iter().any(|t| t.is_empty()) {
        return error(StatusCode::BAD_REQUEST, "input: empty");
    }
    if body
        .get("dimensions")
        .and_then(Value::as_u64)
        .is_some_and(|d| d as usize != DIMENSIONS)
    {
        return error(StatusCode::BAD_REQUEST, "dimensions: only 384");
    }
    if !state.latency.is_zero() {
        tokio::time::sleep(state.latency).await;
    }
    state.served.requests.fetch_add(1, Ordering::Relaxed);
    state
        .served
        .texts
        .fetch_add(texts.len() as u64, Ordering::Relaxed);
    let data: Vec<Value> = texts
        .iter()
        .enumerate()
        .map(|(i, t)| json!({"object": "embedding", "index": i, "embedding": vector(t)}))
        .collect();
    let tokens: usize = texts.iter().map(|t| t.split_whitespace().count()).sum();
    (
        StatusCode::OK,
        Json(json!({
            "object": "list",
            "model": body["model"].as_str().unwrap_or("bench-fake-no-model"),
            "data": data,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        })),
    )
}

/// A deterministic unit vector for `text`: SHA-256 of the text seeds a xorshift generator.
pub fn vector(text: &str) -> Vec<f32> {
    let digest = Sha256::digest(text.as_bytes());
    let mut seed = [0u8; 8];
    seed.copy_from_slice(&digest[..8]);
    let mut x = u64::from_le_bytes(seed) | 1;
    let mut v: Vec<f32> = (0..DIMENSIONS)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        })
        .collect();
    let norm = v
        .iter()
        .map(|a| a * a)
        .sum::<f32>()
        .sqrt()
        .max(f32::MIN_POSITIVE);
    for a in &mut v {
        *a /= norm;
    }
    v
}
