//! The `qdrant` sink: a Qdrant server or cluster over gRPC (`qdrant-client`, port 6334).
//!
//! Same data model and semantics as [`super::embedded`]: one collection, named dense vector
//! `text` (cosine), one point per chunk with a deterministic UUID, a `_cdc` payload object,
//! keyword payload indexes on `_cdc.table` and `_cdc.key`, and vector-less delete markers that
//! `fetch` and `count` leave out.
//!
//! **Durability.** Every write passes `wait=true`, and every reply must report `Completed`:
//! Qdrant has then written the operation to its WAL and applied it, so `Ok` means durable and
//! the pipeline may ack. Any other status (say `WaitTimeout`) is a transient error and the
//! batch is retried, which is safe because every operation we send is idempotent.
//!
//! **Round trips and order.** A batch costs a few calls, not one per document, always in the
//! order of [`Write`]: the removals and markers (truncates and their table markers, key
//! deletes, surplus chunks, delete markers, empty documents) as ordered `update_batch`
//! requests, then upserts in requests of at most [`MAX_POINTS`] points or about
//! [`MAX_BYTES`] — every document's chunk 0, its commit record, after its other chunks, so a
//! crash between two requests never leaves a chunk 0 that vouches for chunks not written —
//! then payload overwrites of chunk 0 as ordered `update_batch` requests. Qdrant applies a
//! batch's operations one after the other and stops at the first failure; a retry repeats
//! them all, harmlessly. Payload writes *overwrite* (Qdrant's `set_payload` merge drops keys
//! whose value is `null`; an upsert and an overwrite keep them).
//!
//! **Errors** become pipeline decisions in one place, [`classify`]: the server unreachable,
//! overloaded, timing out or failing internally is transient (retry, keep order, pause
//! intake); invalid input is poison (the pipeline finds the culprit by writing document by
//! document, or directly when a one-point upsert is refused); refused credentials, a deleted
//! collection or a server without the API are fatal.
//!
//! **Payloads** use `qdrant-client`'s serde conversion: integers travel as `i64` and floats as
//! `f64`, both exact. Only an integer above `i64::MAX` (which Debezium does not produce for
//! PostgreSQL) would come back as a float, and object keys come back in another order
//! (protobuf maps).
//!
//! The client connects on its first call, so [`QdrantSink::connect`] fails only on
//! configuration. The compatibility check is skipped: it blocks and prints to stdout.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use qdrant_client::qdrant::{
    Condition, CountPointsBuilder, CreateCollectionBuilder, CreateFieldIndexCollectionBuilder,
    Distance, FieldType, Filter, GetPointsBuilder, NamedVectors, PointId, PointStruct,
    PointsSelector, PointsUpdateOperation, QueryPointsBuilder, ScrollPointsBuilder,
    UpdateBatchPointsBuilder, UpdateResult, UpdateStatus, UpsertPointsBuilder, VectorParamsBuilder,
    VectorsConfigBuilder, point_id::PointIdOptions, points_update_operation, vectors_config,
};
use qdrant_client::{Payload, Qdrant, QdrantError};
use serde_json::Value;

use super::{
    Hit, SCAN_FIELDS, ScanPage, ScanScope, ScannedPoint, Sink, StoredPoint, VECTOR_NAME, Write,
    sort_by_chunk,
};
use crate::batch::{PayloadWrite, split_ranges};
use crate::config::{SinkConfig, read_secret, redact_url};
use crate::error::{ErrorKind, StageError};
use crate::model::{DocumentKey, Row};
use crate::progress::Progress;
use crate::stored::{StoredState, stored_state};

/// Most points in one upsert request.
const MAX_POINTS: usize = 256;
/// Most operations in one `update_batch` request.
const MAX_OPS: usize = 512;
/// Rough upper bound of one write request's size: big payloads (a long row repeated in each
/// of its chunks) make for smaller requests, each well within the timeout.
const MAX_BYTES: usize = 8 << 20;
/// Connection establishment gives up after this (or the request timeout, if shorter).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The payload fields with a keyword index: every filter we send uses them.
const INDEXED_FIELDS: [&str; 2] = ["_cdc.table", "_cdc.key"];

pub struct QdrantSink {
    client: Qdrant,
    collection: String,
    /// The URL as logged (credentials redacted).
    url: String,
}

impl QdrantSink {
    /// Builds the client. No connection is made; every error here is a fatal configuration
    /// error. The API key is never logged.
    pub fn connect(config: &SinkConfig) -> Result<QdrantSink, StageError> {
        let url = redact_url(&config.url);
        let uri: tonic::transport::Uri = config
            .url
            .parse()
            .map_err(|e| StageError::fatal(format!("sink.url: `{url}` is not a URL: {e}")))?;
        let tls = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => {
                return Err(StageError::fatal(format!(
                    "sink.url: `{url}`: the Qdrant gRPC URL must start with http:// or https:// (TLS), e.g. http://127.0.0.1:6334"
                )));
            }
        };
        if uri.port_u16() == Some(6333) {
            tracing::warn!(url = %url, "sink.url names port 6333, Qdrant's REST port; the qdrant sink speaks gRPC (port 6334 by default)");
        }
        let api_key = read_secret(config.api_key_file.as_deref(), &config.api_key_env)
            .map_err(StageError::fatal)?;
        let loopback = matches!(
            uri.host(),
            Some("localhost" | "127.0.0.1" | "[::1]" | "::1")
        );
        if api_key.is_some() && !tls && !loopback {
            tracing::warn!(url = %url, "the Qdrant API key travels unencrypted over http://; use https://");
        }
        let timeout = Duration::from_millis(config.timeout_ms);
        let client = Qdrant::from_url(&config.url)
            .timeout(timeout)
            .connect_timeout(timeout.min(CONNECT_TIMEOUT))
            .api_key(api_key)
            .skip_compatibility_check()
            .build()
            .map_err(|e| StageError::fatal(format!("sink.url: cannot use `{url}`: {e}")))?;
        Ok(QdrantSink {
            client,
            collection: config.collection.clone(),
            url,
        })
    }

    /// A classified error, with where and what.
    fn err(&self, what: &str, e: QdrantError) -> StageError {
        let mut err = classify(&e);
        err.message = format!(
            "Qdrant at {} ({what} on `{}`): {}",
            self.url, self.collection, err.message
        );
        err
    }

    /// A write reply that does not say `Completed` was not confirmed as applied.
    fn completed(&self, what: &str, result: Option<&UpdateResult>) -> Result<(), StageError> {
        let status = result.map(|r| UpdateStatus::try_from(r.status));
        if let Some(Ok(UpdateStatus::Completed)) = status {
            return Ok(());
        }
        Err(StageError::transient(format!(
            "Qdrant at {} ({what} on `{}`): the write was not confirmed as applied (status {}); retrying",
            self.url,
            self.collection,
            match status {
                Some(Ok(s)) => s.as_str_name().to_string(),
                Some(Err(_)) => format!("code {}", result.map_or(0, |r| r.status)),
                None => "missing".to_string(),
            }
        )))
    }

    /// Sends `ops` in order, as few `update_batch` requests as the limits allow.
    async fn update_batch(
        &self,
        what: &str,
        ops: Vec<(PointsUpdateOperation, usize)>,
    ) -> Result<(), StageError> {
        let sizes: Vec<usize> = ops.iter().map(|(_, size)| *size).collect();
        let mut ops = ops.into_iter().map(|(op, _)| op);
        for group in split_ranges(&sizes, MAX_OPS, MAX_BYTES) {
            let chunk: Vec<PointsUpdateOperation> = ops.by_ref().take(group.len()).collect();
            let response = self
                .client
                .update_points_batch(
                    UpdateBatchPointsBuilder::new(&self.collection, chunk).wait(true),
                )
                .await
                .map_err(|e| self.err(what, e))?;
            Progress::current().beat();
            crate::faults::after_write_request();
            if response.result.len() != group.len() {
                return Err(StageError::transient(format!(
                    "Qdrant at {} ({what} on `{}`): {} results for {} operations; retrying",
                    self.url,
                    self.collection,
                    response.result.len(),
                    group.len()
                )));
            }
            for result in &response.result {
                self.completed(what, Some(result))?;
            }
        }
        Ok(())
    }

    async fn prepare_collection(&self, vector_size: usize) -> Result<(), StageError> {
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
            let created = self
                .client
                .create_collection(
                    CreateCollectionBuilder::new(&self.collection).vectors_config(vectors),
                )
                .await;
            match created {
                Ok(_) => {
                    tracing::info!(collection = %self.collection, vector_size, "created the Qdrant collection")
                }
                // Another instance may have created it meanwhile: then check what it made.
                Err(e) => {
                    let now = self.client.collection_exists(&self.collection).await;
                    if !matches!(now, Ok(true)) {
                        return Err(self.err("create_collection", e));
                    }
                }
            }
        }
        let info = self
            .client
            .collection_info(&self.collection)
            .await
            .map_err(|e| self.err("collection_info", e))?
            .result
            .ok_or_else(|| {
                StageError::transient(format!(
                    "Qdrant at {}: no information on collection `{}`",
                    self.url, self.collection
                ))
            })?;
        let vectors = info
            .config
            .as_ref()
            .and_then(|c| c.params.as_ref())
            .and_then(|p| p.vectors_config.as_ref())
            .and_then(|v| v.config.as_ref());
        check_vector(&self.collection, vectors, vector_size)?;
        // Also after a crash between creating the collection and its indexes.
        for field in INDEXED_FIELDS {
            if info.payload_schema.contains_key(field) {
                continue;
            }
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
            tracing::info!(collection = %self.collection, field, "created a keyword payload index");
        }
        Ok(())
    }
}

/// The one place Qdrant errors become pipeline decisions.
///
/// Qdrant maps its errors to gRPC codes (`StorageError` → `tonic::Status`): bad input and
/// strict-mode violations are `InvalidArgument`, a missing collection or point `NotFound`, a
/// write lock or a shard not ready `FailedPrecondition`, internal failures (disk full
/// included) `Internal`, rate limits `ResourceExhausted`, timeouts `DeadlineExceeded`. The
/// client reports a failed connection as `Internal` and its own timeout as `Cancelled`.
pub fn classify(e: &QdrantError) -> StageError {
    use tonic::Code;
    let status = match e {
        QdrantError::ResponseError { status } => status,
        QdrantError::ResourceExhaustedError {
            status,
            retry_after_seconds,
        } => {
            return StageError::transient(format!(
                "rate limited, retry after {retry_after_seconds} s: {}",
                status.message()
            ));
        }
        QdrantError::ConversionError(m) => return StageError::poison(format!("conversion: {m}")),
        QdrantError::InvalidUri(e) => return StageError::fatal(format!("invalid URL: {e}")),
        other => return StageError::transient(other.to_string()),
    };
    let message = format!("{:?}: {}", status.code(), status.message());
    match status.code() {
        Code::Unavailable
        | Code::DeadlineExceeded
        | Code::ResourceExhausted
        | Code::Aborted
        | Code::Internal
        | Code::Unknown
        | Code::Cancelled
        | Code::DataLoss
        | Code::Ok => StageError::transient(message),
        // "Storage locked" (an operator's write lock) or "Pre-condition failure" (a shard
        // not in a state to take the write): the cluster's state, not the message, is at
        // fault, and dead-lettering would lose the change from the index.
        Code::FailedPrecondition => StageError::transient(message),
        // `item` stays `None`: the pipeline isolates the culprit by writing op by op.
        Code::InvalidArgument | Code::OutOfRange | Code::AlreadyExists => {
            StageError::poison(message)
        }
        // A payload update of a point that is gone concerns that document only.
        Code::NotFound if status.message().contains("No point with id") => {
            StageError::poison(message)
        }
        Code::NotFound => StageError::fatal(format!(
            "not found (was the collection deleted? restart to re-create it): {message}"
        )),
        Code::Unauthenticated | Code::PermissionDenied => StageError::fatal(format!(
            "credentials refused (check the API key in sink.api_key_env / sink.api_key_file): {message}"
        )),
        Code::Unimplemented => StageError::fatal(format!(
            "the server does not offer this API (Qdrant too old?): {message}"
        )),
    }
}

/// The collection's `text` vector must have the model's size and cosine distance.
fn check_vector(
    collection: &str,
    vectors: Option<&vectors_config::Config>,
    vector_size: usize,
) -> Result<(), StageError> {
    let describe = |size: u64, distance: i32| {
        let distance = Distance::try_from(distance).map_or_else(
            |_| format!("code {distance}"),
            |d| d.as_str_name().to_string(),
        );
        format!("size {size}, distance {distance}")
    };
    let found = match vectors {
        Some(vectors_config::Config::ParamsMap(map)) => match map.map.get(VECTOR_NAME) {
            Some(p) if p.size == vector_size as u64 && p.distance == Distance::Cosine as i32 => {
                return Ok(());
            }
            Some(p) => describe(p.size, p.distance),
            None => {
                let mut names: Vec<&str> = map.map.keys().map(String::as_str).collect();
                names.sort_unstable();
                format!("missing (named vectors: {})", names.join(", "))
            }
        },
        Some(vectors_config::Config::Params(p)) => format!(
            "missing (one unnamed vector, {})",
            describe(p.size, p.distance)
        ),
        None => "missing (no dense vectors)".to_string(),
    };
    Err(StageError::fatal(format!(
        "Qdrant collection `{collection}` has vector `{VECTOR_NAME}` = {found}, but the model needs size {vector_size}, distance Cosine; \
         set another sink.collection or delete this one to re-index"
    )))
}

/// Roughly the encoded size of a JSON value.
fn approx_size(value: &Value) -> usize {
    match value {
        Value::Null | Value::Bool(_) => 2,
        Value::Number(_) => 10,
        Value::String(s) => s.len() + 4,
        Value::Array(items) => 4 + items.iter().map(approx_size).sum::<usize>(),
        Value::Object(map) => {
            4 + map
                .iter()
                .map(|(k, v)| k.len() + 4 + approx_size(v))
                .sum::<usize>()
        }
    }
}

fn row_size(row: &Row) -> usize {
    row.iter().map(|(k, v)| k.len() + 4 + approx_size(v)).sum()
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

/// The points of `scope`: a table, or some documents (their tables and keys).
fn scope_filter(scope: ScanScope<'_>) -> Filter {
    match scope {
        ScanScope::Table(table) => table_filter(table),
        ScanScope::Keys(keys) => {
            let mut tables: Vec<String> = keys.iter().map(|k| k.table.clone()).collect();
            tables.dedup();
            Filter::must([
                Condition::matches("_cdc.table", tables),
                Condition::matches(
                    "_cdc.key",
                    keys.iter().map(|k| k.key.clone()).collect::<Vec<_>>(),
                ),
            ])
        }
    }
}

/// `filter` (or everything) minus markers (deleted rows, truncates, empty documents): what
/// counts as a stored document.
fn documents_only(filter: Option<Filter>) -> Filter {
    let mut filter = filter.unwrap_or_default();
    filter.must_not = vec![
        Condition::matches("_cdc.deleted", true),
        Condition::matches("_cdc.empty", true),
    ];
    filter
}

/// Vector-less points, in groups, as ordered operations.
fn marker_ops(markers: &[PayloadWrite]) -> Vec<(PointsUpdateOperation, usize)> {
    let sizes: Vec<usize> = markers.iter().map(|m| 64 + row_size(&m.payload)).collect();
    split_ranges(&sizes, MAX_POINTS, MAX_BYTES)
        .into_iter()
        .map(|group| {
            let size = sizes[group.clone()].iter().sum();
            let points = markers[group]
                .iter()
                .map(|m| {
                    // No vector: searches never find it; `fetch` and `count` filter it out.
                    PointStruct::new(
                        point_id(&m.id),
                        NamedVectors::default(),
                        qdrant_payload(&m.payload),
                    )
                })
                .collect();
            (upsert_op(points), size)
        })
        .collect()
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

/// qdrant payload → JSON object.
fn json_payload(payload: HashMap<String, qdrant_client::qdrant::Value>) -> Row {
    serde_json::Map::from(Payload::from(payload))
}

/// JSON object → qdrant payload.
fn qdrant_payload(row: &Row) -> HashMap<String, qdrant_client::qdrant::Value> {
    Payload::from(row.clone()).into()
}

fn delete_op(selector: impl Into<PointsSelector>) -> PointsUpdateOperation {
    PointsUpdateOperation {
        operation: Some(points_update_operation::Operation::DeletePoints(
            points_update_operation::DeletePoints {
                points: Some(selector.into()),
                ..Default::default()
            },
        )),
    }
}

fn upsert_op(points: Vec<PointStruct>) -> PointsUpdateOperation {
    PointsUpdateOperation {
        operation: Some(points_update_operation::Operation::Upsert(
            points_update_operation::PointStructList {
                points,
                ..Default::default()
            },
        )),
    }
}

/// Replaces one point's whole payload (its vectors stay).
fn overwrite_payload_op(id: &uuid::Uuid, payload: &Row) -> PointsUpdateOperation {
    PointsUpdateOperation {
        operation: Some(points_update_operation::Operation::OverwritePayload(
            points_update_operation::OverwritePayload {
                payload: qdrant_payload(payload),
                points_selector: Some(vec![point_id(id)].into()),
                ..Default::default()
            },
        )),
    }
}

#[async_trait]
impl Sink for QdrantSink {
    fn name(&self) -> &'static str {
        "qdrant"
    }

    async fn prepare(&self, vector_size: usize) -> Result<(), StageError> {
        // A refused collection or index (a bad name, say) is configuration: fatal.
        self.prepare_collection(vector_size)
            .await
            .map_err(|e| match e.kind {
                ErrorKind::Poison => StageError {
                    kind: ErrorKind::Fatal,
                    ..e
                },
                _ => e,
            })
    }

    async fn read_states(
        &self,
        keys: &[DocumentKey],
    ) -> Result<HashMap<DocumentKey, StoredState>, StageError> {
        if keys.is_empty() {
            return Ok(HashMap::new());
        }
        let by_id: HashMap<uuid::Uuid, &DocumentKey> =
            keys.iter().map(|k| (k.point_id(0), k)).collect();
        let ids: Vec<PointId> = by_id.keys().map(point_id).collect();
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
            let Ok(id) = uuid::Uuid::parse_str(&id_text(point.id)) else {
                continue;
            };
            if let (Some(key), Some(state)) =
                (by_id.get(&id), stored_state(&json_payload(point.payload)))
            {
                states.insert((*key).clone(), state);
            }
        }
        Ok(states)
    }

    async fn write(&self, write: Arc<Write>) -> Result<(), StageError> {
        // 1. Removals and markers, in order.
        let mut removals = Vec::new();
        for table in &write.truncate_tables {
            removals.push((delete_op(table_filter(table)), 64 + table.len()));
        }
        removals.extend(marker_ops(&write.table_markers));
        // One delete per table (and per 1,024 keys), not one per key.
        let mut by_table: std::collections::BTreeMap<&str, Vec<String>> = Default::default();
        for key in &write.delete_keys {
            by_table
                .entry(&key.table)
                .or_default()
                .push(key.key.clone());
        }
        for (table, keys) in by_table {
            for keys in keys.chunks(1024) {
                let size = 64 + keys.iter().map(|k| k.len() + 4).sum::<usize>();
                let filter = Filter::must([
                    keyword("_cdc.table", table),
                    Condition::matches("_cdc.key", keys.to_vec()),
                ]);
                removals.push((delete_op(filter), size));
            }
        }
        for ids in write.delete_points.chunks(MAX_OPS * 8) {
            let ids: Vec<PointId> = ids.iter().map(point_id).collect();
            let size = 48 * ids.len();
            removals.push((delete_op(ids), size));
        }
        removals.extend(marker_ops(&write.markers));
        self.update_batch("delete", removals).await?;

        // 2. Upserts with their vectors, in order (commit records last). A refused one-point
        //    request names its point.
        let sizes: Vec<usize> = write
            .upserts
            .iter()
            .map(|p| 64 + 4 * p.vector.len() + row_size(&p.payload))
            .collect();
        for group in split_ranges(&sizes, MAX_POINTS, MAX_BYTES) {
            let points: Vec<PointStruct> = write.upserts[group.clone()]
                .iter()
                .map(|p| {
                    PointStruct::new(
                        point_id(&p.id),
                        NamedVectors::default().add_vector(VECTOR_NAME, p.vector.clone()),
                        qdrant_payload(&p.payload),
                    )
                })
                .collect();
            let response = self
                .client
                .upsert_points(UpsertPointsBuilder::new(&self.collection, points).wait(true))
                .await
                .map_err(|e| {
                    let err = self.err("upsert", e);
                    if err.kind == ErrorKind::Poison && group.len() == 1 {
                        err.at(group.start)
                    } else {
                        err
                    }
                })?;
            Progress::current().beat();
            crate::faults::after_write_request();
            self.completed("upsert", response.result.as_ref())?;
        }

        // 3. Payload overwrites of chunk 0 (vectors unchanged).
        let updates = write
            .payload_updates
            .iter()
            .map(|u| {
                (
                    overwrite_payload_op(&u.id, &u.payload),
                    64 + row_size(&u.payload),
                )
            })
            .collect();
        self.update_batch("overwrite_payload", updates).await
    }

    async fn search(
        &self,
        vector: Vec<f32>,
        table: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Hit>, StageError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let mut query = QueryPointsBuilder::new(&self.collection)
            .query(vector)
            .using(VECTOR_NAME)
            .limit(limit as u64)
            .with_payload(true);
        if let Some(table) = table {
            query = query.filter(table_filter(table));
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

    async fn scan(
        &self,
        scope: ScanScope<'_>,
        after: Option<&str>,
        limit: usize,
    ) -> Result<ScanPage, StageError> {
        if matches!(scope, ScanScope::Keys([])) {
            return Ok(ScanPage::default());
        }
        let mut request = ScrollPointsBuilder::new(&self.collection)
            .filter(scope_filter(scope))
            .limit(limit.clamp(1, u32::MAX as usize) as u32)
            .with_payload(qdrant_client::qdrant::PayloadIncludeSelector::new(
                SCAN_FIELDS.map(str::to_string).to_vec(),
            ))
            .with_vectors(false);
        if let Some(after) = after {
            request = request.offset(PointId::from(after.to_string()));
        }
        let response = self
            .client
            .scroll(request)
            .await
            .map_err(|e| self.err("scroll", e))?;
        let wanted: Option<std::collections::HashSet<&DocumentKey>> = match scope {
            ScanScope::Keys(keys) => Some(keys.iter().collect()),
            ScanScope::Table(_) => None,
        };
        let points = response
            .result
            .into_iter()
            .filter_map(|p| ScannedPoint::from_payload(id_text(p.id), &json_payload(p.payload)))
            .filter(|p| wanted.as_ref().is_none_or(|w| w.contains(&p.key)))
            .collect();
        Ok(ScanPage {
            points,
            next: response.next_page_offset.map(|id| id_text(Some(id))),
        })
    }

    async fn count(&self, table: Option<&str>) -> Result<u64, StageError> {
        let response = self
            .client
            .count(
                CountPointsBuilder::new(&self.collection)
                    .filter(documents_only(table.map(table_filter)))
                    .exact(true),
            )
            .await
            .map_err(|e| self.err("count", e))?;
        Ok(response.result.map_or(0, |r| r.count))
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
    use qdrant_client::qdrant::{VectorParams, VectorParamsMap};
    use serde_json::json;
    use tonic::Code;

    fn status(code: Code, message: &str) -> QdrantError {
        QdrantError::ResponseError {
            status: tonic::Status::new(code, message),
        }
    }

    fn kind(code: Code, message: &str) -> ErrorKind {
        classify(&status(code, message)).kind
    }

    #[test]
    fn grpc_codes_classify() {
        for code in [
            Code::Unavailable,
            Code::DeadlineExceeded,
            Code::ResourceExhausted,
            Code::Aborted,
            Code::Internal,
            Code::Unknown,
            Code::Cancelled,
        ] {
            assert_eq!(kind(code, "x"), ErrorKind::Transient, "{code:?}");
        }
        let poison = classify(&status(
            Code::InvalidArgument,
            "Wrong input: Vector dimension error",
        ));
        assert_eq!(poison.kind, ErrorKind::Poison);
        assert_eq!(
            poison.item, None,
            "the pipeline isolates the culprit itself"
        );
        assert!(
            poison.message.contains("Vector dimension error"),
            "{poison}"
        );
        assert_eq!(kind(Code::OutOfRange, "x"), ErrorKind::Poison);
        assert_eq!(
            kind(Code::Unauthenticated, "Invalid api-key"),
            ErrorKind::Fatal
        );
        assert_eq!(kind(Code::PermissionDenied, "x"), ErrorKind::Fatal);
        assert_eq!(kind(Code::Unimplemented, "x"), ErrorKind::Fatal);
    }

    #[test]
    fn not_found_is_fatal_for_a_collection_and_poison_for_a_point() {
        let gone = classify(&status(
            Code::NotFound,
            "Not found: Collection `cdc_documents` doesn't exist!",
        ));
        assert_eq!(gone.kind, ErrorKind::Fatal);
        assert!(gone.message.contains("collection deleted"), "{gone}");
        assert_eq!(
            kind(
                Code::NotFound,
                "Not found: No point with id 8c1b0a6e-0f7c-5f0b-9a5e-3f4b1c2d3e4f found"
            ),
            ErrorKind::Poison
        );
    }

    #[test]
    fn a_write_lock_or_a_shard_not_ready_is_waited_out() {
        assert_eq!(
            kind(
                Code::FailedPrecondition,
                "Storage locked: Write operations are forbidden"
            ),
            ErrorKind::Transient
        );
        assert_eq!(
            kind(
                Code::FailedPrecondition,
                "Pre-condition failure: shard is not active"
            ),
            ErrorKind::Transient
        );
    }

    #[test]
    fn client_side_errors_classify() {
        let limited = QdrantError::ResourceExhaustedError {
            status: tonic::Status::resource_exhausted("Rate limiting exceeded"),
            retry_after_seconds: 3,
        };
        assert_eq!(classify(&limited).kind, ErrorKind::Transient);
        assert_eq!(
            classify(&QdrantError::ConversionError("sparse".into())).kind,
            ErrorKind::Poison
        );
        let bad = "http://[::1".parse::<tonic::transport::Uri>().unwrap_err();
        assert_eq!(
            classify(&QdrantError::InvalidUri(bad)).kind,
            ErrorKind::Fatal
        );
    }

    #[test]
    fn payload_round_trips_exactly() {
        let row = json!({
            "max": i64::MAX, "min": i64::MIN, "neg": -5, "zero": 0,
            "f": 1.5, "whole_float": 3.0, "tiny": 1e-300, "huge": 1.7976931348623157e308, "third": 0.1 + 0.2,
            "s": "grüße ✓", "empty": "", "b": true, "n": null,
            "nested": {"a": [1, "two", {"three": 3.25}, [], {}], "deep": {"deeper": {"x": false}}},
            "_cdc": {"table": "public.t", "key": "{\"id\":1}", "chunk": 0, "chunks": 2,
                     "position": {"connector": "dbserver1", "lsn": 123_456_789_012_u64}}
        });
        let row = row.as_object().cloned().unwrap_or_default();
        let back = json_payload(qdrant_payload(&row));
        assert_eq!(Value::Object(back.clone()), Value::Object(row));
        // Integers stay integers, floats floats.
        assert_eq!(back["max"].as_i64(), Some(i64::MAX));
        assert!(back["whole_float"].is_f64());
        assert_eq!(back["max"].to_string(), "9223372036854775807");
    }

    #[test]
    fn an_integer_above_i64_max_comes_back_as_a_float() {
        let row = json!({"u": u64::MAX})
            .as_object()
            .cloned()
            .unwrap_or_default();
        let back = json_payload(qdrant_payload(&row));
        assert!(back["u"].is_f64(), "{back:?}");
    }

    fn params(size: u64, distance: Distance) -> VectorParams {
        VectorParamsBuilder::new(size, distance).build()
    }

    fn named(name: &str, p: VectorParams) -> vectors_config::Config {
        vectors_config::Config::ParamsMap(VectorParamsMap {
            map: [(name.to_string(), p)].into_iter().collect(),
        })
    }

    #[test]
    fn the_text_vector_must_match_the_model() {
        assert!(
            check_vector(
                "c",
                Some(&named("text", params(384, Distance::Cosine))),
                384
            )
            .is_ok()
        );
        let e = check_vector(
            "c",
            Some(&named("text", params(384, Distance::Cosine))),
            385,
        )
        .expect_err("size");
        assert_eq!(e.kind, ErrorKind::Fatal);
        assert!(
            e.message.contains("size 384") && e.message.contains("size 385"),
            "{e}"
        );
        assert!(e.message.contains("`c`"), "names the collection: {e}");
        let e = check_vector("c", Some(&named("text", params(384, Distance::Dot))), 384)
            .expect_err("distance");
        assert!(e.message.contains("distance Dot"), "{e}");
        let e = check_vector(
            "c",
            Some(&named("other", params(384, Distance::Cosine))),
            384,
        )
        .expect_err("name");
        assert!(e.message.contains("named vectors: other"), "{e}");
        let unnamed = vectors_config::Config::Params(params(384, Distance::Cosine));
        let e = check_vector("c", Some(&unnamed), 384).expect_err("unnamed");
        assert!(e.message.contains("unnamed"), "{e}");
        assert!(check_vector("c", None, 384).is_err());
    }

    fn config(url: &str) -> SinkConfig {
        SinkConfig {
            url: url.into(),
            api_key_env: "CDC_INDEXER_TEST_QDRANT_KEY_UNSET".into(),
            ..SinkConfig::default()
        }
    }

    #[tokio::test]
    async fn connect_checks_the_url_without_connecting() {
        for url in ["http://127.0.0.1:6334", "https://qdrant.example.com:6334"] {
            let sink = QdrantSink::connect(&config(url)).expect(url);
            assert_eq!(sink.name(), "qdrant");
        }
        for url in ["127.0.0.1:6334", "grpc://127.0.0.1:6334", "http://[::1", ""] {
            let err = QdrantSink::connect(&config(url))
                .err()
                .unwrap_or_else(|| panic!("{url} accepted"));
            assert_eq!(err.kind, ErrorKind::Fatal, "{url}: {err}");
            assert!(err.message.starts_with("sink.url"), "{err}");
        }
    }

    #[tokio::test]
    async fn an_unreadable_api_key_file_is_fatal() {
        let config = SinkConfig {
            api_key_file: Some("/nonexistent/cdc-indexer/qdrant.key".into()),
            ..config("http://127.0.0.1:6334")
        };
        let err = QdrantSink::connect(&config).err().expect("refused");
        assert_eq!(err.kind, ErrorKind::Fatal, "{err}");
    }
}
