//! The `llamaindex` sink: HTTP to `python-indexer/` (FastAPI + LlamaIndex over Qdrant), for
//! teams whose RAG stack is LlamaIndex. The service owns its collection; we send whole
//! documents (all chunks of a key, with our vectors and `_cdc` metadata) and it replaces
//! every earlier node of that key, so a repeated upsert is idempotent.
//!
//! Delete markers (`Write::markers`) are not sent: the service keeps no vector-less points,
//! so with this sink an old event replayed after its row's delete can re-create the document.
//!
//! Endpoints: `POST /v1/documents:upsert`, `:delete`, `:get`, `:count`, `:scan`, `POST /v1/search`,
//! `GET /healthz`. Timeouts and 5xx are transient (the pipeline retries), 4xx poison.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::{Value, json};

use super::{Hit, ScanPage, ScanScope, ScannedPoint, Sink, StoredPoint, Write, sort_by_chunk};
use crate::config::{SinkConfig, read_secret, redact_url};
use crate::error::StageError;
use crate::model::{DocumentKey, Row};
use crate::progress::Progress;
use crate::stored::{StoredKind, StoredState, key_of, stored_state};

pub struct LlamaIndexSink {
    client: reqwest::Client,
    base: String,
    api_key: Option<String>,
}

impl LlamaIndexSink {
    pub fn new(config: &SinkConfig) -> Result<LlamaIndexSink, StageError> {
        let api_key = read_secret(config.api_key_file.as_deref(), &config.api_key_env)
            .map_err(StageError::fatal)?;
        let builder = reqwest::Client::builder()
            .timeout(Duration::from_millis(config.timeout_ms))
            .connect_timeout(Duration::from_secs(5))
            .pool_idle_timeout(Duration::from_secs(60));
        let client = crate::tls::http(builder, "sink", &config.tls())?
            .build()
            .map_err(|e| StageError::fatal(format!("cannot build the HTTP client: {e}")))?;
        Ok(LlamaIndexSink {
            client,
            base: config.url.trim_end_matches('/').to_string(),
            api_key,
        })
    }

    async fn post(&self, path: &str, body: &Value) -> Result<Value, StageError> {
        let url = format!("{}{path}", self.base);
        let mut request = self.client.post(&url).json(body);
        if let Some(key) = &self.api_key {
            request = request.bearer_auth(key);
        }
        let response = request.send().await.map_err(|e| {
            let mut err = StageError::from_reqwest_in(&e, "sink");
            err.message = format!(
                "python-indexer at {}: {}",
                redact_url(&self.base),
                err.message
            );
            err
        })?;
        let status = response.status();
        let text = response
            .text()
            .await
            .map_err(|e| StageError::from_reqwest_in(&e, "sink"))?;
        Progress::current().beat();
        if !status.is_success() {
            // The body may quote the rejected input (row data): only its start is kept.
            return Err(StageError::from_http_status(
                status.as_u16(),
                format!(
                    "python-indexer {path}: {}",
                    crate::error::body_excerpt(&text)
                ),
            ));
        }
        serde_json::from_str(&text).map_err(|e| {
            StageError::transient(format!("python-indexer {path}: unreadable answer: {e}"))
        })
    }

    async fn get_documents(
        &self,
        keys: &[DocumentKey],
        with_embeddings: bool,
    ) -> Result<Vec<Value>, StageError> {
        let keys: Vec<Value> = keys
            .iter()
            .map(|k| json!({"table": k.table, "key": k.key}))
            .collect();
        let body = json!({ "keys": keys, "with_embeddings": with_embeddings });
        let answer = self.post("/v1/documents:get", &body).await?;
        Ok(answer["documents"].as_array().cloned().unwrap_or_default())
    }
}

fn object(value: &Value) -> Row {
    value.as_object().cloned().unwrap_or_default()
}

/// The service's chunk (`id`, `text`, `metadata`) as our stored payload.
fn chunk_payload(chunk: &Value) -> Row {
    let mut payload = object(&chunk["metadata"]);
    if let Some(text) = chunk.get("text") {
        payload.insert("text".into(), text.clone());
    }
    payload
}

#[async_trait]
impl Sink for LlamaIndexSink {
    fn name(&self) -> &'static str {
        "llamaindex"
    }

    async fn prepare(&self, vector_size: usize) -> Result<(), StageError> {
        let url = format!("{}/healthz", self.base);
        let response = self.client.get(&url).send().await.map_err(|e| {
            let mut err = StageError::from_reqwest_in(&e, "sink");
            err.message = format!(
                "python-indexer at {}: {}",
                redact_url(&self.base),
                err.message
            );
            err
        })?;
        if !response.status().is_success() {
            return Err(StageError::transient(format!(
                "python-indexer at {} is not healthy: HTTP {}",
                redact_url(&self.base),
                response.status()
            )));
        }
        let health: Value = response
            .json()
            .await
            .map_err(|e| StageError::transient(format!("python-indexer /healthz: {e}")))?;
        match health["vector_size"].as_u64() {
            Some(size) if size as usize == vector_size => self.check_credentials().await,
            Some(size) => Err(StageError::fatal(format!(
                "python-indexer's collection `{}` has vectors of size {size}, but our model gives {vector_size}",
                health["collection"].as_str().unwrap_or("?")
            ))),
            None => Err(StageError::fatal(
                "python-indexer /healthz does not report vector_size; is it the right service?",
            )),
        }
    }

    async fn read_states(
        &self,
        keys: &[DocumentKey],
    ) -> Result<HashMap<DocumentKey, StoredState>, StageError> {
        // The service keeps no markers, so no table truncate markers either.
        let keys: Vec<DocumentKey> = keys
            .iter()
            .filter(|k| !k.is_table_marker())
            .cloned()
            .collect();
        if keys.is_empty() {
            return Ok(HashMap::new());
        }
        let mut states = HashMap::new();
        for doc in self.get_documents(&keys, false).await? {
            let Some(first) = doc["chunks"].as_array().and_then(|c| c.first()) else {
                continue;
            };
            let key = DocumentKey {
                table: doc["table"].as_str().unwrap_or_default().to_string(),
                key: doc["key"].as_str().unwrap_or_default().to_string(),
            };
            if let Some(state) = stored_state(&chunk_payload(first)) {
                states.insert(key, state);
            }
        }
        Ok(states)
    }

    async fn write(&self, write: Arc<Write>) -> Result<(), StageError> {
        // Markers are not stored by the service; a document whose text became empty is
        // removed with its key.
        let emptied = write
            .markers
            .iter()
            .filter(|m| stored_state(&m.payload).is_some_and(|s| s.kind == StoredKind::Empty))
            .filter_map(|m| key_of(&m.payload));
        let delete_keys: Vec<DocumentKey> =
            write.delete_keys.iter().cloned().chain(emptied).collect();
        if !write.truncate_tables.is_empty() || !delete_keys.is_empty() {
            let keys: Vec<Value> = delete_keys
                .iter()
                .map(|k| json!({"table": k.table, "key": k.key}))
                .collect();
            self.post(
                "/v1/documents:delete",
                &json!({"keys": keys, "tables": write.truncate_tables}),
            )
            .await?;
        }
        // The service replaces whole documents, so group points by key; surplus chunks
        // (`delete_points`) vanish with the replacement. Payload-only updates resend the
        // stored chunks (read with their vectors) with their new metadata: nothing is
        // re-embedded.
        let mut documents: BTreeMap<(String, String), Vec<Value>> = BTreeMap::new();
        for point in &write.upserts {
            let (table, key) = cdc_key(&point.payload)?;
            let mut metadata = point.payload.clone();
            let text = metadata
                .remove("text")
                .unwrap_or(Value::String(String::new()));
            documents.entry((table, key)).or_default().push(json!({
                "id": point.id.to_string(), "text": text, "embedding": point.vector, "metadata": metadata,
            }));
        }
        let mut payload_only: BTreeMap<(String, String), HashMap<String, Row>> = BTreeMap::new();
        for update in &write.payload_updates {
            let (table, key) = cdc_key(&update.payload)?;
            payload_only
                .entry((table, key))
                .or_default()
                .insert(update.id.to_string(), update.payload.clone());
        }
        if !payload_only.is_empty() {
            let keys: Vec<DocumentKey> = payload_only
                .keys()
                .map(|(t, k)| DocumentKey {
                    table: t.clone(),
                    key: k.clone(),
                })
                .collect();
            for doc in self.get_documents(&keys, true).await? {
                let id = (
                    doc["table"].as_str().unwrap_or_default().to_string(),
                    doc["key"].as_str().unwrap_or_default().to_string(),
                );
                let Some(updates) = payload_only.get(&id) else {
                    continue;
                };
                let chunks = doc["chunks"].as_array().cloned().unwrap_or_default();
                let resent: Vec<Value> = chunks
                    .iter()
                    .map(|c| {
                        let chunk_id = c["id"].as_str().unwrap_or_default();
                        // A payload write carries the whole payload, its text included.
                        let (text, metadata) = match updates.get(chunk_id) {
                            Some(update) => {
                                let mut metadata = update.clone();
                                let text = metadata.remove("text").unwrap_or_else(|| c["text"].clone());
                                (text, Value::Object(metadata))
                            }
                            None => (c["text"].clone(), c["metadata"].clone()),
                        };
                        json!({"id": chunk_id, "text": text, "embedding": c.get("embedding").cloned().unwrap_or(Value::Null), "metadata": metadata})
                    })
                    .collect();
                documents.entry(id).or_insert(resent);
            }
        }
        if !documents.is_empty() {
            let docs: Vec<Value> = documents
                .into_iter()
                .map(|((table, key), chunks)| json!({"table": table, "key": key, "chunks": chunks}))
                .collect();
            self.post("/v1/documents:upsert", &json!({ "documents": docs }))
                .await?;
        }
        Ok(())
    }

    async fn search(
        &self,
        vector: Vec<f32>,
        table: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Hit>, StageError> {
        let mut body = json!({"embedding": vector, "limit": limit});
        if let Some(t) = table {
            body["table"] = json!(t);
        }
        let answer = self.post("/v1/search", &body).await?;
        Ok(answer["results"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|r| Hit {
                id: r["id"].as_str().unwrap_or_default().to_string(),
                score: r["score"].as_f64().unwrap_or(0.0) as f32,
                payload: chunk_payload(r),
            })
            .collect())
    }

    async fn fetch(&self, key: &DocumentKey) -> Result<Vec<StoredPoint>, StageError> {
        let docs = self.get_documents(std::slice::from_ref(key), false).await?;
        let mut points: Vec<StoredPoint> = docs
            .iter()
            .flat_map(|d| d["chunks"].as_array().cloned().unwrap_or_default())
            .map(|c| StoredPoint {
                id: c["id"].as_str().unwrap_or_default().to_string(),
                payload: chunk_payload(&c),
            })
            .collect();
        sort_by_chunk(&mut points);
        Ok(points)
    }

    async fn scan(
        &self,
        scope: ScanScope<'_>,
        after: Option<&str>,
        limit: usize,
    ) -> Result<ScanPage, StageError> {
        let body = match scope {
            ScanScope::Table(table) => json!({"table": table, "after": after, "limit": limit}),
            ScanScope::Keys([]) => return Ok(ScanPage::default()),
            ScanScope::Keys(keys) => {
                let keys: Vec<Value> = keys
                    .iter()
                    .map(|k| json!({"table": k.table, "key": k.key}))
                    .collect();
                json!({"keys": keys, "after": after, "limit": limit})
            }
        };
        let answer = self.post("/v1/documents:scan", &body).await?;
        let points = answer["points"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .filter_map(|p| {
                ScannedPoint::from_payload(
                    p["id"].as_str().unwrap_or_default().to_string(),
                    &object(&p["metadata"]),
                )
            })
            .collect();
        Ok(ScanPage {
            points,
            next: answer["next"].as_str().map(str::to_string),
        })
    }

    async fn count(&self, table: Option<&str>) -> Result<u64, StageError> {
        let answer = self
            .post("/v1/documents:count", &json!({ "table": table }))
            .await?;
        answer["count"]
            .as_u64()
            .ok_or_else(|| StageError::transient("python-indexer :count without a count"))
    }

    async fn health(&self) -> Result<(), StageError> {
        let url = format!("{}/healthz", self.base);
        match self.client.get(&url).send().await {
            Ok(r) if r.status().is_success() => Ok(()),
            Ok(r) => Err(StageError::transient(format!(
                "python-indexer unhealthy: HTTP {}",
                r.status()
            ))),
            Err(e) => Err(StageError::from_reqwest_in(&e, "sink")),
        }
    }
}

impl LlamaIndexSink {
    /// `/healthz` is open to everyone: an authenticated call (a `:get` of no keys, which
    /// reads nothing) tells at start whether the service takes our API key. A 401/403 is
    /// fatal and says which setting to fix.
    async fn check_credentials(&self) -> Result<(), StageError> {
        let url = format!("{}/v1/documents:get", self.base);
        let mut request = self.client.post(&url).json(&json!({ "keys": [] }));
        if let Some(key) = &self.api_key {
            request = request.bearer_auth(key);
        }
        let response = request
            .send()
            .await
            .map_err(|e| StageError::from_reqwest_in(&e, "sink"))?;
        match response.status().as_u16() {
            200..=299 => Ok(()),
            status @ (401 | 403) => Err(StageError::fatal(format!(
                "python-indexer at {} refused our API key (HTTP {status}, {}): set \
                 sink.api_key_env / sink.api_key_file to its PYTHON_INDEXER_API_KEY",
                redact_url(&self.base),
                if self.api_key.is_some() {
                    "a wrong key was sent"
                } else {
                    "no key was sent"
                }
            ))),
            status => {
                let body = response.text().await.unwrap_or_default();
                Err(StageError::from_http_status(
                    status,
                    format!(
                        "python-indexer /v1/documents:get: {}",
                        crate::error::body_excerpt(&body)
                    ),
                ))
            }
        }
    }
}

fn cdc_key(payload: &Row) -> Result<(String, String), StageError> {
    let cdc = payload
        .get("_cdc")
        .ok_or_else(|| StageError::fatal("point without _cdc metadata"))?;
    Ok((
        cdc["table"].as_str().unwrap_or_default().to_string(),
        cdc["key"].as_str().unwrap_or_default().to_string(),
    ))
}
