//! The `qdrant` sink: a Qdrant server or cluster over gRPC (`qdrant-client`).
//!
//! Every write passes `wait=true`: Qdrant answers only once the operation is applied (and
//! in its WAL), so `Ok` means durable and the pipeline may ack. The client keeps one
//! HTTP/2 connection pool for all calls. TLS is used for `https://` URLs; the API key comes
//! from an env var or a file and is never logged.
//!
//! Errors are classified in [`classify`]: unavailable, deadline, resource exhausted and the
//! like are transient (the pipeline retries and pauses); invalid argument is poison (the
//! pipeline isolates the offending op by writing op by op); auth failures are fatal.

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use qdrant_client::qdrant::{
    Condition, CountPointsBuilder, CreateCollectionBuilder, CreateFieldIndexCollectionBuilder,
    DeletePointsBuilder, Distance, FieldType, Filter, GetPointsBuilder, NamedVectors, PointId,
    PointStruct, PointsIdsList, QueryPointsBuilder, ScrollPointsBuilder, SetPayloadPointsBuilder,
    UpsertPointsBuilder, VectorParamsBuilder, VectorsConfigBuilder, point_id::PointIdOptions,
    vectors_config,
};
use qdrant_client::{Payload, Qdrant, QdrantError};

use super::{Hit, Sink, StoredPoint, VECTOR_NAME, Write, sort_by_chunk};
use crate::batch::{StoredState, stored_state};
use crate::config::{SinkConfig, read_secret, redact_url};
use crate::error::StageError;
use crate::model::{DocumentKey, Row};

pub struct QdrantSink {
    client: Qdrant,
    collection: String,
    url: String,
}

/// Points per upsert request.
const UPSERT_CHUNK: usize = 256;

impl QdrantSink {
    pub fn connect(config: &SinkConfig) -> Result<QdrantSink, StageError> {
        let api_key = read_secret(config.api_key_file.as_deref(), &config.api_key_env)
            .map_err(StageError::fatal)?;
        let mut builder = Qdrant::from_url(&config.url)
            .timeout(Duration::from_millis(config.timeout_ms))
            .connect_timeout(Duration::from_secs(5))
            .keep_alive_while_idle()
            .skip_compatibility_check();
        if let Some(key) = api_key {
            builder = builder.api_key(key);
        }
        let client = builder.build().map_err(|e| {
            StageError::fatal(format!(
                "sink.url: cannot use Qdrant URL {}: {e}",
                redact_url(&config.url)
            ))
        })?;
        Ok(QdrantSink {
            client,
            collection: config.collection.clone(),
            url: redact_url(&config.url),
        })
    }

    fn err(&self, what: &str, e: QdrantError) -> StageError {
        let mut err = classify(&e);
        err.message = format!(
            "Qdrant at {} ({what} on `{}`): {}",
            self.url, self.collection, err.message
        );
        err
    }
}

/// The one place Qdrant errors become pipeline decisions.
pub fn classify(e: &QdrantError) -> StageError {
    use tonic::Code;
    match e {
        QdrantError::ResponseError { status } => {
            let message = format!("{:?}: {}", status.code(), status.message());
            match status.code() {
                Code::Unavailable
                | Code::DeadlineExceeded
                | Code::ResourceExhausted
                | Code::Aborted
                | Code::Internal
                | Code::Unknown
                | Code::Cancelled => StageError::transient(message),
                Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => {
                    StageError::poison(message)
                }
                Code::Unauthenticated | Code::PermissionDenied => {
                    StageError::fatal(format!("credentials refused: {message}"))
                }
                Code::NotFound => {
                    StageError::fatal(format!("not found (collection deleted?): {message}"))
                }
                _ => StageError::transient(message),
            }
        }
        QdrantError::ResourceExhaustedError {
            status,
            retry_after_seconds,
        } => StageError::transient(format!(
            "rate limited for {retry_after_seconds} s: {}",
            status.message()
        )),
        QdrantError::ConversionError(m) => StageError::poison(format!("conversion: {m}")),
        QdrantError::InvalidUri(e) => StageError::fatal(format!("invalid URI: {e}")),
        other => StageError::transient(other.to_string()),
    }
}

fn keyword(field: &str, value: &str) -> Condition {
    Condition::matches(field, value.to_string())
}

fn key_filter(key: &DocumentKey) -> Filter {
    Filter::must([
        keyword("_cdc.table", &key.table),
        keyword("_cdc.key", &key.key),
    ])
}

fn table_filter(table: &str) -> Filter {
    Filter::must([keyword("_cdc.table", table)])
}

/// `filter` (or everything) minus delete markers.
fn documents_only(filter: Option<Filter>) -> Filter {
    let mut filter = filter.unwrap_or_default();
    filter.must_not = vec![Condition::matches("_cdc.deleted", true)];
    filter
}

fn point_id(id: &uuid::Uuid) -> PointId {
    PointId::from(id.to_string())
}

fn id_text(id: Option<PointId>) -> String {
    match id.and_then(|p| p.point_id_options) {
        Some(PointIdOptions::Uuid(u)) => u,
        Some(PointIdOptions::Num(n)) => n.to_string(),
        None => String::new(),
    }
}

/// qdrant payload → JSON object (integers stay integers).
fn json_payload(payload: HashMap<String, qdrant_client::qdrant::Value>) -> Row {
    serde_json::Map::from(Payload::from(payload))
}

fn qdrant_payload(row: &Row) -> Payload {
    Payload::from(row.clone())
}

#[async_trait]
impl Sink for QdrantSink {
    fn name(&self) -> &'static str {
        "qdrant"
    }

    async fn prepare(&self, vector_size: usize) -> Result<(), StageError> {
        let exists = self
            .client
            .collection_exists(&self.collection)
            .await
            .map_err(|e| self.err("collection_exists", e))?;
        if !exists {
            let mut vectors = VectorsConfigBuilder::default();
            vectors.add_named_vector_params(
                VECTOR_NAME,
                VectorParamsBuilder::new(vector_size as u64, Distance::Cosine),
            );
            self.client
                .create_collection(
                    CreateCollectionBuilder::new(&self.collection).vectors_config(vectors),
                )
                .await
                .map_err(|e| self.err("create_collection", e))?;
            for field in ["_cdc.table", "_cdc.key"] {
                self.client
                    .create_field_index(
                        CreateFieldIndexCollectionBuilder::new(
                            &self.collection,
                            field,
                            FieldType::Keyword,
                        )
                        .wait(true),
                    )
                    .await
                    .map_err(|e| self.err("create_field_index", e))?;
            }
            tracing::info!(collection = %self.collection, vector_size, "created Qdrant collection");
            return Ok(());
        }
        let info = self
            .client
            .collection_info(&self.collection)
            .await
            .map_err(|e| self.err("collection_info", e))?;
        let params = info
            .result
            .and_then(|r| r.config)
            .and_then(|c| c.params)
            .and_then(|p| p.vectors_config)
            .and_then(|v| v.config);
        let found = match params {
            Some(vectors_config::Config::ParamsMap(map)) => {
                map.map.get(VECTOR_NAME).map(|p| (p.size, p.distance))
            }
            Some(vectors_config::Config::Params(_)) => None,
            None => None,
        };
        match found {
            Some((size, distance))
                if size == vector_size as u64 && distance == Distance::Cosine as i32 =>
            {
                Ok(())
            }
            other => Err(StageError::fatal(format!(
                "Qdrant collection `{}` has vector `{VECTOR_NAME}` = {}, but the model needs size {vector_size}, distance Cosine; \
                 use another sink.collection or re-create it",
                self.collection,
                match other {
                    Some((s, d)) => format!(
                        "size {s}, distance {:?}",
                        Distance::try_from(d).unwrap_or(Distance::UnknownDistance)
                    ),
                    None => "missing (unnamed or other vectors)".to_string(),
                }
            ))),
        }
    }

    async fn read_states(
        &self,
        keys: &[DocumentKey],
    ) -> Result<HashMap<DocumentKey, StoredState>, StageError> {
        if keys.is_empty() {
            return Ok(HashMap::new());
        }
        let by_id: HashMap<String, &DocumentKey> = keys
            .iter()
            .map(|k| (k.point_id(0).to_string(), k))
            .collect();
        let ids: Vec<PointId> = keys.iter().map(|k| point_id(&k.point_id(0))).collect();
        let response = self
            .client
            .get_points(
                GetPointsBuilder::new(&self.collection, ids)
                    .with_payload(true)
                    .with_vectors(false),
            )
            .await
            .map_err(|e| self.err("get_points", e))?;
        let mut states = HashMap::new();
        for point in response.result {
            let id = id_text(point.id);
            if let (Some(key), Some(state)) =
                (by_id.get(&id), stored_state(&json_payload(point.payload)))
            {
                states.insert((*key).clone(), state);
            }
        }
        Ok(states)
    }

    async fn write(&self, write: &Write) -> Result<(), StageError> {
        let c = &self.collection;
        for table in &write.truncate_tables {
            self.client
                .delete_points(
                    DeletePointsBuilder::new(c)
                        .points(table_filter(table))
                        .wait(true),
                )
                .await
                .map_err(|e| self.err("truncate", e))?;
        }
        for key in &write.delete_keys {
            self.client
                .delete_points(
                    DeletePointsBuilder::new(c)
                        .points(key_filter(key))
                        .wait(true),
                )
                .await
                .map_err(|e| self.err("delete", e))?;
        }
        if !write.markers.is_empty() {
            let markers: Vec<PointStruct> = write
                .markers
                .iter()
                .map(|m| {
                    PointStruct::new(
                        point_id(&m.id),
                        NamedVectors::default(),
                        qdrant_payload(&m.payload),
                    )
                })
                .collect();
            self.client
                .upsert_points(UpsertPointsBuilder::new(c, markers).wait(true))
                .await
                .map_err(|e| self.err("upsert markers", e))?;
        }
        if !write.delete_points.is_empty() {
            let ids: Vec<PointId> = write.delete_points.iter().map(point_id).collect();
            self.client
                .delete_points(
                    DeletePointsBuilder::new(c)
                        .points(PointsIdsList { ids })
                        .wait(true),
                )
                .await
                .map_err(|e| self.err("delete surplus", e))?;
        }
        for (n, chunk) in write.upserts.chunks(UPSERT_CHUNK).enumerate() {
            let points: Vec<PointStruct> = chunk
                .iter()
                .map(|p| {
                    PointStruct::new(
                        point_id(&p.id),
                        NamedVectors::default().add_vector(VECTOR_NAME, p.vector.clone()),
                        qdrant_payload(&p.payload),
                    )
                })
                .collect();
            self.client
                .upsert_points(UpsertPointsBuilder::new(c, points).wait(true))
                .await
                .map_err(|e| {
                    let mut err = self.err("upsert", e);
                    // A rejected single-point chunk names its point for poison isolation.
                    if chunk.len() == 1 {
                        err.item = Some(n * UPSERT_CHUNK);
                    }
                    err
                })?;
        }
        for update in &write.payload_updates {
            self.client
                .set_payload(
                    SetPayloadPointsBuilder::new(c, qdrant_payload(&update.payload))
                        .points_selector(PointsIdsList {
                            ids: vec![point_id(&update.id)],
                        })
                        .wait(true),
                )
                .await
                .map_err(|e| self.err("set_payload", e))?;
        }
        Ok(())
    }

    async fn search(
        &self,
        vector: Vec<f32>,
        table: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Hit>, StageError> {
        let mut query = QueryPointsBuilder::new(&self.collection)
            .query(vector)
            .using(VECTOR_NAME)
            .limit(limit as u64)
            .with_payload(true);
        if let Some(t) = table {
            query = query.filter(table_filter(t));
        }
        let response = self
            .client
            .query(query)
            .await
            .map_err(|e| self.err("query", e))?;
        Ok(response
            .result
            .into_iter()
            .map(|p| Hit {
                id: id_text(p.id),
                score: p.score,
                payload: json_payload(p.payload),
            })
            .collect())
    }

    async fn fetch(&self, key: &DocumentKey) -> Result<Vec<StoredPoint>, StageError> {
        let response = self
            .client
            .scroll(
                ScrollPointsBuilder::new(&self.collection)
                    .filter(documents_only(Some(key_filter(key))))
                    .limit(10_000)
                    .with_payload(true)
                    .with_vectors(false),
            )
            .await
            .map_err(|e| self.err("scroll", e))?;
        let mut points: Vec<StoredPoint> = response
            .result
            .into_iter()
            .map(|p| StoredPoint {
                id: id_text(p.id),
                payload: json_payload(p.payload),
            })
            .collect();
        sort_by_chunk(&mut points);
        Ok(points)
    }

    async fn count(&self, table: Option<&str>) -> Result<u64, StageError> {
        let filter = documents_only(table.map(table_filter));
        let response = self
            .client
            .count(
                CountPointsBuilder::new(&self.collection)
                    .filter(filter)
                    .exact(true),
            )
            .await
            .map_err(|e| self.err("count", e))?;
        Ok(response.result.map(|r| r.count).unwrap_or(0))
    }

    async fn health(&self) -> Result<(), StageError> {
        self.client
            .health_check()
            .await
            .map(|_| ())
            .map_err(|e| self.err("health_check", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;
    use serde_json::{Value, json};

    fn status(code: tonic::Code) -> QdrantError {
        QdrantError::ResponseError {
            status: tonic::Status::new(code, "x"),
        }
    }

    #[test]
    fn grpc_codes_classify() {
        use tonic::Code;
        for code in [
            Code::Unavailable,
            Code::DeadlineExceeded,
            Code::ResourceExhausted,
            Code::Aborted,
            Code::Internal,
        ] {
            assert_eq!(
                classify(&status(code)).kind,
                ErrorKind::Transient,
                "{code:?}"
            );
        }
        assert_eq!(
            classify(&status(Code::InvalidArgument)).kind,
            ErrorKind::Poison
        );
        assert_eq!(
            classify(&status(Code::Unauthenticated)).kind,
            ErrorKind::Fatal
        );
        assert_eq!(
            classify(&status(Code::PermissionDenied)).kind,
            ErrorKind::Fatal
        );
        assert_eq!(classify(&status(Code::NotFound)).kind, ErrorKind::Fatal);
    }

    #[test]
    fn payload_round_trips_exactly() {
        let row = json!({"big": 9223372036854775807i64, "neg": -5, "f": 1.5, "s": "x", "b": true, "n": null,
                         "nested": {"a": [1, "two", {"three": 3}]}, "_cdc": {"table": "public.t", "chunk": 0}});
        let row = row.as_object().cloned().unwrap_or_default();
        let payload = qdrant_payload(&row);
        let back = json_payload(payload.into());
        assert_eq!(Value::Object(back), Value::Object(row));
    }
}
