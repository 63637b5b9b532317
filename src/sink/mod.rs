//! The vector index, behind one trait.
//!
//! Implementations: [`embedded`] (qdrant-edge in-process, the zero-setup default), [`qdrant`]
//! (a Qdrant server over gRPC) and [`llamaindex`] (the python-indexer service). All share the
//! data model of DESIGN §4 and [`crate::stored`]: one collection, named dense vector `text`
//! (cosine), one point per chunk with a deterministic id, chunk 0 the document's commit
//! record, vector-less markers.
//!
//! Contract: when [`Sink::write`] returns `Ok`, the write is durable (a crash now loses
//! nothing), because the pipeline acks right after. A sink applies a [`Write`] in its order
//! and never reorders it: a crash between two of its requests must leave every document
//! either as it was or with its new chunks but its old chunk 0, which the redelivery repairs.

pub mod embedded;
pub mod llamaindex;
pub mod qdrant;

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;

use crate::batch::{PayloadWrite, WritePlan};
use crate::config::{Config, SinkKind};
use crate::error::StageError;
use crate::model::{DocumentKey, Row};
use crate::stored::StoredState;

/// The name of the dense vector in every collection.
pub const VECTOR_NAME: &str = "text";

/// A point with its vector, ready to write.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    pub id: uuid::Uuid,
    pub vector: Vec<f32>,
    pub payload: Row,
}

/// One batch's writes with vectors filled in, in the order they must be applied (see
/// [`WritePlan`]): truncates (delete by table, then the table markers), key deletes, point
/// deletes, markers, upserts (commit records last), payload overwrites.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Write {
    pub truncate_tables: Vec<String>,
    pub table_markers: Vec<PayloadWrite>,
    pub delete_keys: Vec<DocumentKey>,
    pub delete_points: Vec<uuid::Uuid>,
    /// Vector-less points: delete markers, empty documents (see `WritePlan::markers`).
    pub markers: Vec<PayloadWrite>,
    pub upserts: Vec<Point>,
    /// Whole chunk-0 payloads of documents whose vectors stay (nulls kept).
    pub payload_updates: Vec<PayloadWrite>,
}

impl Write {
    /// Joins a plan with the vectors of its upserts (same order).
    pub fn from_plan(plan: WritePlan, vectors: Vec<Vec<f32>>) -> Write {
        let upserts = plan
            .upserts
            .into_iter()
            .zip(vectors)
            .map(|(p, vector)| Point {
                id: p.id,
                vector,
                payload: p.payload,
            })
            .collect();
        Write {
            truncate_tables: plan.truncate_tables,
            table_markers: plan.table_markers,
            delete_keys: plan.delete_keys,
            delete_points: plan.delete_points,
            markers: plan.markers,
            upserts,
            payload_updates: plan.payload_updates,
        }
    }

    /// What the index will hold for the keys this write touches, once it is applied.
    pub fn overlay(&self) -> crate::stored::Overlay {
        let mut overlay = crate::stored::Overlay::default();
        for table in &self.truncate_tables {
            overlay.truncate(table);
        }
        for m in &self.table_markers {
            overlay.put(&m.payload);
        }
        for key in &self.delete_keys {
            overlay.remove(key);
        }
        for m in &self.markers {
            overlay.put(&m.payload);
        }
        for p in &self.upserts {
            if crate::stored::chunk_of(&p.payload) == 0 {
                overlay.put(&p.payload);
            }
        }
        for u in &self.payload_updates {
            overlay.put(&u.payload);
        }
        overlay
    }

    pub fn is_empty(&self) -> bool {
        self.truncate_tables.is_empty()
            && self.delete_keys.is_empty()
            && self.delete_points.is_empty()
            && self.markers.is_empty()
            && self.upserts.is_empty()
            && self.payload_updates.is_empty()
    }
}

/// A search result.
#[derive(Debug, Clone, PartialEq)]
pub struct Hit {
    pub id: String,
    pub score: f32,
    pub payload: Row,
}

/// Which points a [`Sink::scan`] walks.
#[derive(Debug, Clone, Copy)]
pub enum ScanScope<'a> {
    /// Every point of one table: documents' chunks and markers.
    Table(&'a str),
    /// Every point of these documents.
    Keys(&'a [DocumentKey]),
}

/// The `_cdc` fields a scan returns (never `hidden` or `moved_row`, which hold whole column
/// values): enough to tell documents, chunks and markers apart.
pub const SCAN_FIELDS: [&str; 9] = [
    "_cdc.table",
    "_cdc.key",
    "_cdc.chunk",
    "_cdc.chunks",
    "_cdc.hash",
    "_cdc.position",
    "_cdc.deleted",
    "_cdc.empty",
    "_cdc.truncated",
];

/// One page of a [`Sink::scan`]: points in the index's own order (by point id), and the
/// cursor of the next page (`None` after the last).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ScanPage {
    pub points: Vec<ScannedPoint>,
    pub next: Option<String>,
}

/// One point as a scan sees it: its id and its `_cdc` metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct ScannedPoint {
    pub id: String,
    pub key: DocumentKey,
    pub chunk: u64,
    /// Chunk count `_cdc.chunks` (0 for markers).
    pub chunks: u64,
    pub hash: Option<String>,
    pub position: Option<crate::model::SourcePosition>,
    pub kind: crate::stored::StoredKind,
}

impl ScannedPoint {
    /// Reads a point's payload (its `_cdc` at least); `None` for a point without `_cdc`.
    pub fn from_payload(id: String, payload: &Row) -> Option<ScannedPoint> {
        use crate::stored::StoredKind;
        let cdc = payload.get("_cdc")?;
        let flag = |name: &str| cdc.get(name).and_then(serde_json::Value::as_bool) == Some(true);
        Some(ScannedPoint {
            id,
            key: crate::stored::key_of(payload)?,
            chunk: crate::stored::chunk_of(payload),
            chunks: cdc
                .get("chunks")
                .and_then(serde_json::Value::as_u64)
                .unwrap_or(0),
            hash: cdc
                .get("hash")
                .and_then(serde_json::Value::as_str)
                .map(str::to_string),
            position: cdc
                .get("position")
                .and_then(|p| serde_json::from_value(p.clone()).ok()),
            kind: if flag("deleted") {
                StoredKind::Deleted
            } else if flag("empty") {
                StoredKind::Empty
            } else {
                StoredKind::Document
            },
        })
    }
}

/// A stored point, as tests and `search` see it.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredPoint {
    pub id: String,
    pub payload: Row,
}

#[async_trait]
pub trait Sink: Send + Sync {
    /// `embedded`, `qdrant` or `llamaindex`.
    fn name(&self) -> &'static str;

    /// Creates the collection if missing; a collection with another vector size or distance
    /// is a fatal error naming both.
    async fn prepare(&self, vector_size: usize) -> Result<(), StageError>;

    /// What the index holds for these keys (from chunk 0, markers included; a table's
    /// truncate marker is the key [`DocumentKey::table_marker`]), in one call.
    async fn read_states(
        &self,
        keys: &[DocumentKey],
    ) -> Result<HashMap<DocumentKey, StoredState>, StageError>;

    /// Applies a batch in the order of [`Write`]. Durable when it returns `Ok`. A poison
    /// error carries `item` = the index in `upserts` of the offending point when the sink can
    /// tell.
    async fn write(&self, write: Arc<Write>) -> Result<(), StageError>;

    /// Nearest chunks to `vector`, optionally within one table. Hits carry their document's
    /// row fields (joined from chunk 0 by [`search_with_fields`]).
    async fn search(
        &self,
        vector: Vec<f32>,
        table: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Hit>, StageError>;

    /// Every stored point of one document, sorted by chunk.
    async fn fetch(&self, key: &DocumentKey) -> Result<Vec<StoredPoint>, StageError>;

    /// One page of the points in `scope` (markers included), `limit` at most, starting after
    /// the cursor `after` of the previous page; payloads limited to [`SCAN_FIELDS`]. For
    /// `reconcile`: memory is bounded by the page, whatever the table's size.
    async fn scan(
        &self,
        scope: ScanScope<'_>,
        after: Option<&str>,
        limit: usize,
    ) -> Result<ScanPage, StageError>;

    /// Number of points, optionally of one table.
    async fn count(&self, table: Option<&str>) -> Result<u64, StageError>;

    /// Is the index reachable?
    async fn health(&self) -> Result<(), StageError>;

    /// Called when the pipeline is idle (e.g. to let the embedded engine optimise).
    async fn idle(&self) {}
}

/// Builds the configured sink.
pub async fn from_config(config: &Config) -> Result<Arc<dyn Sink>, StageError> {
    Ok(match config.sink.kind {
        SinkKind::Embedded => Arc::new(embedded::EmbeddedSink::open(&config.sink.path)?),
        SinkKind::Llamaindex => Arc::new(llamaindex::LlamaIndexSink::new(&config.sink)?),
        SinkKind::Qdrant => Arc::new(qdrant::QdrantSink::connect(&config.sink)?),
    })
}

/// Sorts stored points by `_cdc.chunk`.
pub fn sort_by_chunk(points: &mut [StoredPoint]) {
    points.sort_by_key(|p| crate::stored::chunk_of(&p.payload));
}

/// [`Sink::search`], with every hit's document fields joined in from its chunk 0 (row fields
/// are stored once per document).
pub async fn search_with_fields(
    sink: &dyn Sink,
    vector: Vec<f32>,
    table: Option<&str>,
    limit: usize,
) -> Result<Vec<Hit>, StageError> {
    let mut hits = sink.search(vector, table, limit).await?;
    let keys: Vec<DocumentKey> = hits
        .iter()
        .filter(|h| crate::stored::chunk_of(&h.payload) != 0)
        .filter_map(|h| crate::stored::key_of(&h.payload))
        .collect();
    if keys.is_empty() {
        return Ok(hits);
    }
    let states = sink.read_states(&keys).await?;
    for hit in &mut hits {
        if let Some(state) = crate::stored::key_of(&hit.payload).and_then(|k| states.get(&k)) {
            crate::stored::join_fields(&mut hit.payload, &state.payload);
        }
    }
    Ok(hits)
}
