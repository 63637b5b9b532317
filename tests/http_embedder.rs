//! The `http` embedding provider against the python-indexer's real OpenAI-compatible
//! `/v1/embeddings`, and its 429 handling against a local server that rate-limits.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use cdc_indexer::config::{EmbeddingConfig, EmbeddingProvider};
use cdc_indexer::embed::Embedder;
use cdc_indexer::embed::http::HttpEmbedder;
use cdc_indexer::error::ErrorKind;
use common::*;

fn http_config(url: &str) -> EmbeddingConfig {
    EmbeddingConfig {
        provider: EmbeddingProvider::Http,
        url: url.to_string(),
        batch_size: 4,
        ..EmbeddingConfig::default()
    }
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb: f32 = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (na * nb)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_provider_matches_the_local_model_and_isolates_a_rejected_input() {
    let dir = tempfile::tempdir().expect("tmp");
    let service = PythonIndexer::start(dir.path());
    let http = HttpEmbedder::new(&http_config(&format!("{}/v1", service.url))).expect("embedder");
    let texts: Vec<String> = [
        "a red bicycle",
        "a crimson bike",
        "tax law for small companies",
        "winter hiking boots",
        "espresso",
        "a tent",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    // Six texts in requests of four: order must survive the split.
    let remote = http.embed(&texts).await.expect("embed");
    assert_eq!(remote.len(), 6);
    let local = cdc_indexer::embed::from_config(&EmbeddingConfig {
        model_dir: format!("{REPO}/.models/all-minilm-l6-v2").into(),
        onnxruntime_lib: format!("{REPO}/.models/onnxruntime/libonnxruntime.so").into(),
        ..EmbeddingConfig::default()
    })
    .await
    .expect("local");
    let local = local.embed(&texts).await.expect("local embed");
    for (i, (r, l)) in remote.iter().zip(&local).enumerate() {
        let c = cosine(r, l);
        assert!(
            c > 0.98,
            "text {i}: the service and the daemon disagree (cos {c})"
        );
    }
    assert!(cosine(&remote[0], &remote[1]) > cosine(&remote[0], &remote[2]));

    // The service rejects an empty input: bisection finds it, index 4 of 6.
    let mut bad = texts.clone();
    bad[4] = String::new();
    let err = http.embed(&bad).await.expect_err("rejected");
    assert_eq!(err.kind, ErrorKind::Poison, "{err}");
    assert_eq!(err.item, Some(4), "{err}");

    // Wrong model dimensions are a fatal configuration error.
    let wrong = HttpEmbedder::new(&EmbeddingConfig {
        dimensions: 768,
        ..http_config(&format!("{}/v1", service.url))
    })
    .expect("embedder");
    assert_eq!(
        wrong
            .embed(&["x".to_string()])
            .await
            .expect_err("size")
            .kind,
        ErrorKind::Fatal
    );
}

/// A World whose embedder is the python-indexer's `/v1/embeddings`.
fn http_world(test: &str, url: &str, embedding: &str) -> World {
    let extra = format!("[embedding]\nprovider = \"http\"\nurl = \"{url}/v1\"\n{embedding}");
    let w = World::new(
        test,
        "[[tables]]\ntable = \"public.products\"\nid_columns = [\"id\"]\ntext = \"{name}\"\n",
        "",
    );
    // The World's [embedding] section holds the model paths: switch the provider there.
    let text = std::fs::read_to_string(&w.config_path)
        .expect("config")
        .replace("[embedding]\n", &extra);
    std::fs::write(&w.config_path, text).expect("config");
    w
}

async fn publish_names(w: &World, names: &[(u64, &str)]) {
    let conn = connect().await;
    let ch = confirm_channel(&conn).await;
    for (id, name) in names {
        let body = serde_json::json!({"op": "c", "after": {"id": id, "name": name}, "source": {"name": "dbserver1", "schema": "public", "table": "products", "lsn": id}});
        w.publish(
            &ch,
            "dbserver1.public.products",
            body.to_string().as_bytes(),
        )
        .await;
    }
    let _ = conn.close(200, "ok".into()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_with_the_http_provider_dead_letters_only_the_rejected_event() {
    let dir = tempfile::tempdir().expect("tmp");
    // The service refuses inputs over 40 characters, as a provider refuses inputs beyond
    // its context; and, like every provider, empty inputs.
    let service = PythonIndexer::start_on_with(
        dir.path(),
        free_port(),
        &[("PYTHON_INDEXER_MAX_INPUT_CHARS", "40")],
    );
    let w = http_world("http-embed", &service.url, "");
    w.declare().await;
    publish_names(
        &w,
        &[
            (1, "a red bicycle"),
            (2, "a name far too long for this embedding service to take"),
            (3, "a tent"),
            (4, ""),
            // Two events of one key in one batch; the later is refused: the earlier applies.
            (5, "kept: the earlier event"),
            (5, "a name far too long for this service, the later event"),
        ],
    )
    .await;
    let mut d = w.start();
    d.wait_ready(Duration::from_secs(60));
    d.wait_processed(6.0, Duration::from_secs(60));
    let empty = d.metric_sum("cdc_indexer_empty_documents_total");
    assert!(d.sigterm().success());
    let dead = w.drain_dlq().await;
    assert_eq!(
        dead.len(),
        2,
        "{:?}",
        dead.iter().map(|d| &d.1).collect::<Vec<_>>()
    );
    for (entry, id) in dead.iter().zip([2, 5]) {
        assert_eq!(entry.1["x-cdc-error-kind"], "embed");
        let needle = format!("\"id\":{id},");
        assert!(
            entry
                .2
                .windows(needle.len())
                .any(|w| w == needle.as_bytes()),
            "the refused event: {}",
            String::from_utf8_lossy(&entry.2)
        );
    }
    // The empty text was not sent (providers refuse it): no points, a marker, counted.
    assert_eq!(empty, 1.0);
    let index = w.index().await;
    assert_eq!(index.count(None).await, 3);
    assert!(index.doc("public.products", r#"{"id":4}"#).await.is_empty());
    let five = index.doc("public.products", r#"{"id":5}"#).await;
    assert_eq!(five.len(), 1, "the key's earlier event applies");
    assert_eq!(
        five[0].payload["name"],
        serde_json::json!("kept: the earlier event")
    );
    // The oracle: the last valid state of each key (2 never had one; 4's text is empty).
    drop(five);
    drop(index);
    common::reconcile::assert_index_matches(
        &w,
        &[common::reconcile::Expected::new(
            "public.products",
            "id int PRIMARY KEY, name text",
            [
                (1, "a red bicycle"),
                (3, "a tent"),
                (4, ""),
                (5, "kept: the earlier event"),
            ]
            .map(|(id, name)| serde_json::json!({"id": id, "name": name})),
        )],
    );
    w.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_that_refuses_every_request_stops_the_daemon_instead_of_dead_lettering() {
    let dir = tempfile::tempdir().expect("tmp");
    let service = PythonIndexer::start(dir.path());
    // `dimensions = 768` sent to a 384-d model: the service refuses every request.
    let w = http_world(
        "http-refuses-all",
        &service.url,
        "dimensions = 768\nsend_dimensions = true\n",
    );
    w.declare().await;
    publish_names(&w, &[(1, "one"), (2, "two"), (3, "three")]).await;
    let mut d = w.start();
    let status = d.wait_exit(Duration::from_secs(60));
    assert_eq!(status.code(), Some(3), "fatal: {}", d.log());
    assert!(d.log().contains("refuses every request"), "{}", d.log());
    assert_eq!(w.queue_depth(&w.dlq).await, 0, "nothing dead-lettered");
    w.cleanup().await;
}

/// A server that answers 429 with `Retry-After: 1` to the first request, then proxies to a
/// real python-indexer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_are_waited_out_as_retry_after_says() {
    let dir = tempfile::tempdir().expect("tmp");
    let service = PythonIndexer::start(dir.path());
    let upstream = format!("{}/v1/embeddings", service.url);
    let calls = Arc::new(AtomicUsize::new(0));
    let app = {
        let calls = calls.clone();
        axum::Router::new().route(
            "/v1/embeddings",
            axum::routing::post(move |body: axum::body::Bytes| {
                let calls = calls.clone();
                let upstream = upstream.clone();
                async move {
                    if calls.fetch_add(1, Ordering::SeqCst) == 0 {
                        return axum::response::Response::builder()
                            .status(429)
                            .header("Retry-After", "1")
                            .body(axum::body::Body::from("slow down"))
                            .expect("response");
                    }
                    let answer = reqwest::Client::new()
                        .post(upstream)
                        .header("content-type", "application/json")
                        .body(body)
                        .send()
                        .await
                        .expect("upstream");
                    let bytes = answer.bytes().await.expect("body");
                    axum::response::Response::builder()
                        .status(200)
                        .header("content-type", "application/json")
                        .body(axum::body::Body::from(bytes))
                        .expect("response")
                }
            }),
        )
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    let http = HttpEmbedder::new(&http_config(&format!("http://{addr}/v1"))).expect("embedder");
    let started = Instant::now();
    let vectors = http
        .embed(&["a tent".to_string()])
        .await
        .expect("embedded after the wait");
    let waited = started.elapsed();
    assert_eq!(vectors.len(), 1);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert!(
        waited >= Duration::from_millis(950),
        "Retry-After honoured: {waited:?}"
    );
}

/// Columns named like LlamaIndex's own node fields (`doc_id`, `document_id`, `ref_doc_id`)
/// or like the chunk text reach the python-indexer escaped, so it takes every row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn columns_with_reserved_names_reach_the_python_indexer() {
    let dir = tempfile::tempdir().expect("tmp");
    let service = PythonIndexer::start(dir.path());
    let w = World::new(
        "reserved-names",
        "[[tables]]\ntable = \"public.products\"\nid_columns = [\"id\"]\ntext = \"{name}\"\n",
        "",
    );
    w.use_llamaindex_sink(&service.url);
    w.declare().await;
    let conn = connect().await;
    let ch = confirm_channel(&conn).await;
    let body = serde_json::json!({"op": "c", "after": {"id": 1, "name": "a tent", "doc_id": 7, "document_id": "d", "ref_doc_id": "r", "text": "a column called text"},
        "source": {"name": "dbserver1", "schema": "public", "table": "products", "lsn": 1}});
    w.publish(
        &ch,
        "dbserver1.public.products",
        body.to_string().as_bytes(),
    )
    .await;
    let _ = conn.close(200, "ok".into()).await;
    let mut d = w.start();
    d.wait_ready(Duration::from_secs(60));
    d.wait_processed(1.0, Duration::from_secs(60));
    assert!(d.sigterm().success());
    assert!(w.drain_dlq().await.is_empty(), "the service took the row");
    let sink = cdc_indexer::sink::from_config(&w.config())
        .await
        .expect("sink");
    let doc = sink
        .fetch(&cdc_indexer::model::DocumentKey {
            table: "public.products".into(),
            key: r#"{"id":1}"#.into(),
        })
        .await
        .expect("fetch");
    assert_eq!(doc.len(), 1);
    assert_eq!(doc[0].payload["_col_doc_id"], serde_json::json!(7));
    assert_eq!(
        doc[0].payload["_col_text"],
        serde_json::json!("a column called text")
    );
    assert_eq!(doc[0].payload["text"], serde_json::json!("a tent"));
    // The oracle: the reserved names are ordinary columns of the source table.
    common::reconcile::assert_index_matches(
        &w,
        &[common::reconcile::Expected::new(
            "public.products",
            "id int PRIMARY KEY, name text, doc_id int, document_id text, ref_doc_id text, text text",
            [
                serde_json::json!({"id": 1, "name": "a tent", "doc_id": 7, "document_id": "d", "ref_doc_id": "r", "text": "a column called text"}),
            ],
        )],
    );
    w.cleanup().await;
}

/// An OpenAI-compatible `/v1/embeddings` that takes `latency` per request (a slow model):
/// unit vectors of 384 values. Its base URL (up to `/v1`, without it).
async fn slow_embedder(latency: Duration) -> String {
    let app = axum::Router::new().route(
        "/v1/embeddings",
        axum::routing::post(move |body: axum::body::Bytes| async move {
            let request: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            let n = match &request["input"] {
                serde_json::Value::Array(items) => items.len(),
                _ => 1,
            };
            tokio::time::sleep(latency).await;
            let mut unit = vec![0.0f32; 384];
            unit[0] = 1.0;
            let data: Vec<serde_json::Value> = (0..n)
                .map(|i| serde_json::json!({"index": i, "embedding": unit}))
                .collect();
            axum::Json(serde_json::json!({"data": data, "model": "slow"}))
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

/// The daemon's own share (`cdc_indexer_delivery_to_ack_seconds`) starts when the daemon
/// receives a delivery, not when a batch takes it: a change that arrives while the batch
/// before it is being embedded waits in the prefetch buffer, and that wait is the daemon's.
/// A embeds for 2 s; B arrives 0.2 s after A, waits ~1.8 s for A's embedding, then embeds
/// 2 s itself: its share is ~3.8 s (counted from the batch taking it, ~2 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemons_share_counts_the_wait_in_its_prefetch_buffer() {
    let latency = Duration::from_secs(2);
    let url = slow_embedder(latency).await;
    let w = http_world("share", &url, "dimensions = 384\n");
    w.declare().await;
    let mut d = w.start();
    d.wait_ready(Duration::from_secs(60));
    publish_names(&w, &[(1, "alpha")]).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    publish_names(&w, &[(2, "beta")]).await;
    d.wait_processed(2.0, Duration::from_secs(60));
    let count = d.metric_sum("cdc_indexer_delivery_to_ack_seconds_count");
    let sum = d.metric_sum("cdc_indexer_delivery_to_ack_seconds_sum");
    assert!(d.sigterm().success());
    assert_eq!(count, 2.0);
    // A: >= 2 s; B: >= 2 s of its own embedding + ~1.8 s behind A's.
    let least = 2.0 * latency.as_secs_f64() + latency.as_secs_f64() - 0.2 - 0.5;
    assert!(
        sum >= least,
        "the two shares sum to {sum:.2} s, less than {least:.2} s: B's wait behind A is not counted"
    );
    w.cleanup().await;
}
