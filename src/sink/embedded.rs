//! The embedded sink: Qdrant's own engine (`qdrant-edge`) in-process, on disk.
//!
//! `qdrant-edge` is synchronous, so every call runs on tokio's blocking pool. It has no
//! background optimiser; we run `optimize()` when the pipeline is idle. Durability: each
//! write goes to the shard's WAL, and we `flush()` (WAL and segments) before returning, so
//! an acked message survives a crash; an unflushed write is recovered from the WAL on load.
//!
//! A batch is applied as a sequence of update operations in [`Write`]'s order, upserts in
//! groups of at most [`MAX_POINTS`] points or about [`MAX_BYTES`] (so no single operation
//! holds a whole large batch twice in memory). Payload writes *overwrite* the payload:
//! qdrant-edge's merge (`SetPayload`) drops keys whose value is `null`, an upsert keeps them,
//! and the stored payload must not depend on the write path.
//!
//! One process owns the shard directory. The `search` subcommand therefore asks the running
//! daemon over its side HTTP port, and opens the directory itself only when no daemon runs.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use qdrant_edge::{
    Condition, CountRequest, CreateIndex, Distance, EdgeConfig, EdgeShard, EdgeVectorParams,
    FieldCondition, FieldIndexOperations, Filter, JsonPath, Match, MatchValue, NamedQuery, Payload,
    PayloadFieldSchema, PayloadOps, PayloadSchemaType, PointId, PointInsertOperations,
    PointOperations, PointStruct, QueryEnum, QueryRequest, RetrieveRequest, ScoringQuery,
    ScrollRequest, SetPayloadOp, UpdateOperation, ValueVariants, Vectors, WithPayloadInterface,
    WithVector,
};
use serde_json::Value;

use super::{
    Hit, SCAN_FIELDS, ScanPage, ScanScope, ScannedPoint, Sink, StoredPoint, VECTOR_NAME, Write,
    sort_by_chunk,
};
use crate::batch::{PayloadWrite, split_ranges};
use crate::error::StageError;
use crate::model::{DocumentKey, Row};
use crate::progress::Progress;
use crate::stored::{StoredState, stored_state};

/// Most points in one upsert operation.
const MAX_POINTS: usize = 256;
/// Rough upper bound of one upsert operation's size.
const MAX_BYTES: usize = 8 << 20;

pub struct EmbeddedSink {
    path: std::path::PathBuf,
    shard: Arc<std::sync::OnceLock<EdgeShard>>,
    /// An exclusive lock on `<path>/cdc-indexer.lock`, held while the shard is open: two
    /// processes writing one shard would corrupt it.
    lock: Arc<std::sync::OnceLock<std::fs::File>>,
}

impl EmbeddedSink {
    /// Remembers the directory; the shard is opened (or created) by [`Sink::prepare`], which
    /// knows the vector size.
    pub fn open(path: &Path) -> Result<EmbeddedSink, StageError> {
        Ok(EmbeddedSink {
            path: path.to_path_buf(),
            shard: Arc::new(std::sync::OnceLock::new()),
            lock: Arc::new(std::sync::OnceLock::new()),
        })
    }

    async fn with_shard<T: Send + 'static>(
        &self,
        what: &'static str,
        f: impl FnOnce(&EdgeShard) -> Result<T, StageError> + Send + 'static,
    ) -> Result<T, StageError> {
        let shard = self.shard.clone();
        tokio::task::spawn_blocking(move || {
            let shard = shard
                .get()
                .ok_or_else(|| StageError::fatal("embedded index used before prepare()"))?;
            f(shard)
        })
        .await
        .map_err(|e| StageError::fatal(format!("embedded index {what} panicked: {e}")))?
    }
}

fn engine_error(what: &str, e: impl std::fmt::Display) -> StageError {
    // The engine fails on I/O (disk full, permissions) or on invalid input; neither is fixed
    // by the next message, and a disk problem must not dead-letter data: transient.
    StageError::transient(format!("embedded index {what}: {e}"))
}

fn path(key: &str) -> Result<JsonPath, StageError> {
    JsonPath::try_from(key).map_err(|_| StageError::fatal(format!("invalid payload path {key}")))
}

fn keyword(key: &str, value: &str) -> Result<Condition, StageError> {
    Ok(Condition::Field(FieldCondition::new_match(
        path(key)?,
        Match::Value(MatchValue {
            value: ValueVariants::String(value.to_string()),
        }),
    )))
}

fn must(conditions: Vec<Condition>) -> Filter {
    Filter {
        should: None,
        min_should: None,
        must: Some(conditions),
        must_not: None,
    }
}

fn key_filter(key: &DocumentKey) -> Result<Filter, StageError> {
    Ok(must(vec![
        keyword("_cdc.table", &key.table)?,
        keyword("_cdc.key", &key.key)?,
    ]))
}

/// Every point of any of `keys` (all of one table).
fn keys_filter(table: &str, keys: Vec<String>) -> Result<Filter, StageError> {
    Ok(must(vec![
        keyword("_cdc.table", table)?,
        Condition::Field(FieldCondition::new_match(
            path("_cdc.key")?,
            Match::from(keys),
        )),
    ]))
}

/// Keys grouped by table, in groups of at most `MAX_KEYS_PER_FILTER`.
fn keys_by_table(keys: &[DocumentKey]) -> Vec<(String, Vec<String>)> {
    let mut by_table: std::collections::BTreeMap<&str, Vec<String>> = Default::default();
    for k in keys {
        by_table.entry(&k.table).or_default().push(k.key.clone());
    }
    by_table
        .into_iter()
        .flat_map(|(table, keys)| {
            keys.chunks(MAX_KEYS_PER_FILTER)
                .map(|c| (table.to_string(), c.to_vec()))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Most keys in one delete-by-filter operation.
const MAX_KEYS_PER_FILTER: usize = 1024;

fn table_filter(table: &str) -> Result<Filter, StageError> {
    Ok(must(vec![keyword("_cdc.table", table)?]))
}

/// The points of `scope`: a table, or some documents (their tables and keys).
fn scope_filter(scope: ScanScope<'_>) -> Result<Filter, StageError> {
    match scope {
        ScanScope::Table(table) => table_filter(table),
        ScanScope::Keys(keys) => {
            let any = |values: Vec<String>| Match::from(values);
            let mut tables: Vec<String> = keys.iter().map(|k| k.table.clone()).collect();
            tables.dedup();
            Ok(must(vec![
                Condition::Field(FieldCondition::new_match(path("_cdc.table")?, any(tables))),
                Condition::Field(FieldCondition::new_match(
                    path("_cdc.key")?,
                    any(keys.iter().map(|k| k.key.clone()).collect()),
                )),
            ]))
        }
    }
}

/// `filter` (or everything) minus markers (deleted rows, truncates, empty documents): what
/// counts as a stored document.
fn documents_only(filter: Option<Filter>) -> Result<Filter, StageError> {
    let flag = |name: &str| -> Result<Condition, StageError> {
        Ok(Condition::Field(FieldCondition::new_match(
            path(name)?,
            Match::Value(MatchValue {
                value: ValueVariants::Bool(true),
            }),
        )))
    };
    let mut filter = filter.unwrap_or(Filter {
        should: None,
        min_should: None,
        must: None,
        must_not: None,
    });
    filter.must_not = Some(vec![flag("_cdc.deleted")?, flag("_cdc.empty")?]);
    Ok(filter)
}

/// A vector-less point.
fn marker_point(m: &PayloadWrite) -> qdrant_edge::PointStructPersisted {
    PointStruct::new(
        PointId::Uuid(m.id),
        Vectors::new_named(Vec::<(&str, Vec<f32>)>::new()),
        Value::Object(m.payload.clone()),
    )
    .into()
}

/// Rough size of a payload in bytes (for grouping requests).
fn row_size(row: &Row) -> usize {
    serde_json::to_string(row).map_or(0, |s| s.len())
}

/// The shard's `text` vector must have the model's size and cosine distance.
fn check_vector(shard: &EdgeShard, path: &Path, vector_size: usize) -> Result<(), StageError> {
    let existing = shard
        .config()
        .vectors
        .get(VECTOR_NAME)
        .map(|v| (v.size, v.distance));
    match existing {
        Some((size, Distance::Cosine)) if size == vector_size => Ok(()),
        other => Err(StageError::fatal(format!(
            "the embedded index at {} has vector `{VECTOR_NAME}` = {}, but the model needs size {vector_size}, distance Cosine; \
             point sink.path elsewhere or delete the directory to re-index",
            path.display(),
            match other {
                Some((s, d)) => format!("size {s}, distance {d:?}"),
                None => "missing".to_string(),
            }
        ))),
    }
}

fn payload_map(payload: Option<Payload>) -> Row {
    payload
        .map(|p| p.0.into_iter().collect())
        .unwrap_or_default()
}

#[async_trait]
impl Sink for EmbeddedSink {
    fn name(&self) -> &'static str {
        "embedded"
    }

    async fn prepare(&self, vector_size: usize) -> Result<(), StageError> {
        let path = self.path.clone();
        let cell = self.shard.clone();
        let lock_cell = self.lock.clone();
        tokio::task::spawn_blocking(move || {
            if let Some(shard) = cell.get() {
                return check_vector(shard, &path, vector_size);
            }
            std::fs::create_dir_all(&path).map_err(|e| {
                StageError::fatal(format!("cannot create the embedded index directory {}: {e}", path.display()))
            })?;
            let lock_path = path.join("cdc-indexer.lock");
            let lock = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&lock_path)
                .map_err(|e| StageError::fatal(format!("cannot open {}: {e}", lock_path.display())))?;
            if lock.try_lock().is_err() {
                return Err(StageError::fatal(format!(
                    "the embedded index at {} is open in another process (lock {}): it belongs to the running daemon; `search` and `reconcile` reach it through that daemon's search port (set http.search_listen, and the same in this command's config), or stop the daemon",
                    path.display(),
                    lock_path.display()
                )));
            }
            let _ = lock_cell.set(lock);
            let wanted = EdgeVectorParams::builder(vector_size, Distance::Cosine);
            let exists = path.join("edge_config.json").exists();
            let shard = if exists {
                let shard = EdgeShard::load(&path, None).map_err(|e| {
                    StageError::fatal(format!("cannot open the embedded index at {}: {e}", path.display()))
                })?;
                check_vector(&shard, &path, vector_size)?;
                shard
            } else {
                std::fs::create_dir_all(&path).map_err(|e| {
                    StageError::fatal(format!("cannot create the embedded index directory {}: {e}", path.display()))
                })?;
                let config = EdgeConfig::builder().vector(VECTOR_NAME, wanted.build()).build();
                let shard = EdgeShard::new(&path, config).map_err(|e| {
                    StageError::fatal(format!("cannot create the embedded index at {}: {e}", path.display()))
                })?;
                for field in ["_cdc.table", "_cdc.key"] {
                    shard
                        .update(UpdateOperation::FieldIndexOperation(FieldIndexOperations::CreateIndex(CreateIndex {
                            field_name: self::path(field)?,
                            field_schema: Some(PayloadFieldSchema::FieldType(PayloadSchemaType::Keyword)),
                        })))
                        .map_err(|e| StageError::fatal(format!("cannot create payload index {field}: {e}")))?;
                }
                shard.flush().map_err(|e| engine_error("flush", e))?;
                shard
            };
            let _ = cell.set(shard);
            Ok(())
        })
        .await
        .map_err(|e| StageError::fatal(format!("opening the embedded index panicked: {e}")))?
    }

    async fn read_states(
        &self,
        keys: &[DocumentKey],
    ) -> Result<HashMap<DocumentKey, StoredState>, StageError> {
        if keys.is_empty() {
            return Ok(HashMap::new());
        }
        let by_id: HashMap<uuid::Uuid, DocumentKey> =
            keys.iter().map(|k| (k.point_id(0), k.clone())).collect();
        self.with_shard("read", move |shard| {
            let records = shard
                .retrieve(RetrieveRequest {
                    point_ids: by_id.keys().map(|id| PointId::Uuid(*id)).collect(),
                    with_payload: Some(WithPayloadInterface::Bool(true)),
                    with_vector: Some(WithVector::Bool(false)),
                })
                .map_err(|e| engine_error("retrieve", e))?;
            let mut states = HashMap::new();
            for record in records {
                let PointId::Uuid(id) = record.id else {
                    continue;
                };
                if let (Some(key), Some(state)) =
                    (by_id.get(&id), stored_state(&payload_map(record.payload)))
                {
                    states.insert(key.clone(), state);
                }
            }
            Ok(states)
        })
        .await
    }

    async fn write(&self, write: Arc<Write>) -> Result<(), StageError> {
        let progress = Progress::current();
        self.with_shard("write", move |shard| {
            let apply = |op: UpdateOperation| {
                shard.update(op).map_err(|e| engine_error("update", e))?;
                progress.beat();
                crate::faults::after_write_request();
                Ok::<(), StageError>(())
            };
            let upsert = |points: Vec<qdrant_edge::PointStructPersisted>| {
                apply(UpdateOperation::PointOperation(
                    PointOperations::UpsertPoints(PointInsertOperations::PointsList(points)),
                ))
            };
            for table in &write.truncate_tables {
                apply(UpdateOperation::PointOperation(
                    PointOperations::DeletePointsByFilter(table_filter(table)?),
                ))?;
            }
            if !write.table_markers.is_empty() {
                upsert(write.table_markers.iter().map(marker_point).collect())?;
            }
            // One delete per table (and per 1,024 keys), not one per key.
            for (table, keys) in keys_by_table(&write.delete_keys) {
                apply(UpdateOperation::PointOperation(
                    PointOperations::DeletePointsByFilter(keys_filter(&table, keys)?),
                ))?;
            }
            if !write.delete_points.is_empty() {
                let ids = write
                    .delete_points
                    .iter()
                    .map(|id| PointId::Uuid(*id))
                    .collect();
                apply(UpdateOperation::PointOperation(
                    PointOperations::DeletePoints { ids },
                ))?;
            }
            if !write.markers.is_empty() {
                upsert(write.markers.iter().map(marker_point).collect())?;
            }
            // In order, in groups: every document's chunk 0 comes after its other chunks.
            let sizes: Vec<usize> = write
                .upserts
                .iter()
                .map(|p| 64 + 4 * p.vector.len() + row_size(&p.payload))
                .collect();
            for group in split_ranges(&sizes, MAX_POINTS, MAX_BYTES) {
                let points = write.upserts[group]
                    .iter()
                    .map(|p| {
                        PointStruct::new(
                            PointId::Uuid(p.id),
                            Vectors::new_named([(VECTOR_NAME, p.vector.clone())]),
                            Value::Object(p.payload.clone()),
                        )
                        .into()
                    })
                    .collect();
                upsert(points)?;
            }
            for update in &write.payload_updates {
                apply(UpdateOperation::PayloadOperation(
                    PayloadOps::OverwritePayload(SetPayloadOp {
                        payload: Payload(update.payload.clone().into_iter().collect()),
                        points: Some(vec![PointId::Uuid(update.id)]),
                        filter: None,
                        key: None,
                    }),
                ))?;
            }
            shard.flush().map_err(|e| engine_error("flush", e))
        })
        .await
    }

    async fn search(
        &self,
        vector: Vec<f32>,
        table: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Hit>, StageError> {
        let filter = table.map(table_filter).transpose()?;
        self.with_shard("search", move |shard| {
            let mut request = QueryRequest::new(limit);
            request.query = Some(ScoringQuery::Vector(QueryEnum::Nearest(NamedQuery {
                query: vector.into(),
                using: Some(VECTOR_NAME.to_string()),
            })));
            request.filter = filter;
            request.with_payload = WithPayloadInterface::Bool(true);
            let points = shard.query(request).map_err(|e| engine_error("query", e))?;
            Ok(points
                .into_iter()
                .map(|p| Hit {
                    id: p.id.to_string(),
                    score: p.score,
                    payload: payload_map(p.payload),
                })
                .collect())
        })
        .await
    }

    async fn fetch(&self, key: &DocumentKey) -> Result<Vec<StoredPoint>, StageError> {
        let filter = documents_only(Some(key_filter(key)?))?;
        self.with_shard("scroll", move |shard| {
            let mut request = ScrollRequest::new();
            request.filter = Some(filter);
            request.limit = Some(10_000);
            request.with_payload = Some(WithPayloadInterface::Bool(true));
            let (records, _) = shard
                .scroll(request)
                .map_err(|e| engine_error("scroll", e))?;
            let mut points: Vec<StoredPoint> = records
                .into_iter()
                .map(|r| StoredPoint {
                    id: r.id.to_string(),
                    payload: payload_map(r.payload),
                })
                .collect();
            sort_by_chunk(&mut points);
            Ok(points)
        })
        .await
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
        let filter = scope_filter(scope)?;
        let wanted: Option<std::collections::HashSet<DocumentKey>> = match scope {
            ScanScope::Keys(keys) => Some(keys.iter().cloned().collect()),
            ScanScope::Table(_) => None,
        };
        let offset = after
            .map(|a| {
                uuid::Uuid::parse_str(a)
                    .map(PointId::Uuid)
                    .map_err(|_| StageError::fatal(format!("scan cursor `{a}` is not a point id")))
            })
            .transpose()?;
        let fields = SCAN_FIELDS
            .iter()
            .map(|f| path(f))
            .collect::<Result<Vec<_>, _>>()?;
        self.with_shard("scroll", move |shard| {
            let mut request = ScrollRequest::new();
            request.filter = Some(filter);
            request.offset = offset;
            request.limit = Some(limit.max(1));
            request.with_payload = Some(WithPayloadInterface::Fields(fields));
            let (records, next) = shard
                .scroll(request)
                .map_err(|e| engine_error("scroll", e))?;
            let points = records
                .into_iter()
                .filter_map(|r| {
                    ScannedPoint::from_payload(r.id.to_string(), &payload_map(r.payload))
                })
                .filter(|p| wanted.as_ref().is_none_or(|w| w.contains(&p.key)))
                .collect();
            Ok(ScanPage {
                points,
                next: next.map(|id| id.to_string()),
            })
        })
        .await
    }

    async fn count(&self, table: Option<&str>) -> Result<u64, StageError> {
        let filter = Some(documents_only(table.map(table_filter).transpose()?)?);
        self.with_shard("count", move |shard| {
            let mut request = CountRequest::new();
            request.filter = filter;
            request.exact = true;
            shard
                .count(request)
                .map(|n| n as u64)
                .map_err(|e| engine_error("count", e))
        })
        .await
    }

    async fn health(&self) -> Result<(), StageError> {
        if self.shard.get().is_some() {
            Ok(())
        } else {
            Err(StageError::transient("embedded index not open yet"))
        }
    }

    async fn idle(&self) {
        let result = self
            .with_shard("optimize", |shard| {
                shard.optimize().map_err(|e| engine_error("optimize", e))
            })
            .await;
        if let Err(e) = result {
            tracing::warn!(error = %e, "embedded index optimisation failed");
        }
    }
}
