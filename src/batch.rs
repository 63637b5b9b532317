//! A batch of events → the writes that bring the index to the batch's final state.
//!
//! Two pure steps, both unit-tested without I/O:
//!
//! 1. [`Coalesced::push`]: events for the same document key coalesce in delivery order; the
//!    last op wins. A truncate drops every pending op of its table and is written first, so
//!    ops that came after it still apply.
//! 2. [`plan`]: against what the index holds for those keys ([`StoredState`]), drop stale
//!    events (older source position), skip re-embedding when the text hash is unchanged, and
//!    list surplus chunks to delete when a document shrank.

use std::collections::HashMap;

use serde_json::{Value, json};

use crate::mapping::Document;
use crate::model::{DocumentKey, Row, SourcePosition};

/// One document-level operation after coalescing.
#[derive(Debug, Clone, PartialEq)]
pub enum Planned {
    Upsert {
        doc: Document,
        /// Columns not sent (unchanged TOAST): keep their stored values.
        unavailable: Vec<String>,
        position: Option<SourcePosition>,
        source_ts_ms: Option<i64>,
        /// Index (in the batch) of the delivery that decided this op.
        origin: usize,
    },
    Delete {
        key: DocumentKey,
        position: Option<SourcePosition>,
        origin: usize,
    },
}

impl Planned {
    fn key(&self) -> &DocumentKey {
        match self {
            Planned::Upsert { doc, .. } => &doc.key,
            Planned::Delete { key, .. } => key,
        }
    }
}

/// The coalesced content of a batch.
#[derive(Debug, Default)]
pub struct Coalesced {
    /// Tables truncated in this batch, in order.
    pub truncates: Vec<String>,
    /// Per key, the op that wins, in first-seen order.
    pub ops: Vec<Planned>,
    /// Ops dropped because an op of the same key earlier in the batch is newer (key, origin).
    pub stale: Vec<(DocumentKey, usize)>,
    index: HashMap<DocumentKey, usize>,
}

impl Coalesced {
    /// Adds the next event's op (in delivery order).
    pub fn push(&mut self, op: Planned) {
        let key = op.key().clone();
        match self.index.get(&key) {
            Some(&i)
                if position(&op)
                    .zip(position(&self.ops[i]))
                    .is_some_and(|(new, old)| new.is_older_than(old)) =>
            {
                // A redelivered or replayed old event behind a newer one: it changes nothing.
                self.stale.push((key, origin(&op)));
            }
            Some(&i) => {
                let merged = merge(&self.ops[i], op);
                self.ops[i] = merged;
            }
            None => {
                self.index.insert(key, self.ops.len());
                self.ops.push(op);
            }
        }
    }

    /// Truncate: every pending op of `table` is superseded.
    pub fn truncate(&mut self, table: &str) {
        self.ops.retain(|op| op.key().table != table);
        self.index = self
            .ops
            .iter()
            .enumerate()
            .map(|(i, op)| (op.key().clone(), i))
            .collect();
        if !self.truncates.iter().any(|t| t == table) {
            self.truncates.push(table.to_string());
        }
    }

    pub fn is_empty(&self) -> bool {
        self.truncates.is_empty() && self.ops.is_empty()
    }

    pub fn keys(&self) -> Vec<DocumentKey> {
        self.ops.iter().map(|op| op.key().clone()).collect()
    }
}

fn position(op: &Planned) -> Option<&SourcePosition> {
    match op {
        Planned::Upsert { position, .. } | Planned::Delete { position, .. } => position.as_ref(),
    }
}

/// The batch index of the delivery behind `op`.
pub fn origin(op: &Planned) -> usize {
    match op {
        Planned::Upsert { origin, .. } | Planned::Delete { origin, .. } => *origin,
    }
}

/// The later op wins; but an upsert that lacks TOASTed columns takes them (and the text, if a
/// template column was missing) from an earlier upsert of the same batch.
fn merge(earlier: &Planned, later: Planned) -> Planned {
    match (earlier, later) {
        (
            Planned::Upsert { doc: old, .. },
            Planned::Upsert {
                mut doc,
                unavailable,
                position,
                source_ts_ms,
                origin,
            },
        ) => {
            let mut still_missing = Vec::new();
            for column in unavailable {
                match old.fields.get(&column) {
                    Some(v) => {
                        doc.fields.insert(column, v.clone());
                    }
                    None => still_missing.push(column),
                }
            }
            if doc.text.is_none() && old.text.is_some() {
                doc.text = old.text.clone();
                doc.chunks = old.chunks.clone();
                doc.hash = old.hash.clone();
            }
            Planned::Upsert {
                doc,
                unavailable: still_missing,
                position,
                source_ts_ms,
                origin,
            }
        }
        (_, later) => later,
    }
}

/// What the index holds for a document (read from its chunk 0).
#[derive(Debug, Clone, PartialEq)]
pub struct StoredState {
    /// The document was deleted: only a marker (no vector, no text) keeps its position.
    pub deleted: bool,
    pub hash: Option<String>,
    pub position: Option<SourcePosition>,
    pub chunks: usize,
    /// Row fields in the stored payload.
    pub fields: Row,
}

/// A point to write with a new vector.
#[derive(Debug, Clone, PartialEq)]
pub struct PointWrite {
    pub id: uuid::Uuid,
    pub text: String,
    pub payload: Row,
    /// The batch index of the delivery this point comes from.
    pub origin: usize,
}

/// A point whose payload changes but whose vector stays.
#[derive(Debug, Clone, PartialEq)]
pub struct PayloadWrite {
    pub id: uuid::Uuid,
    pub payload: Row,
}

/// Everything one batch writes, in the order the sink must apply it:
/// truncates, deletes, surplus deletes, then upserts and payload updates.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct WritePlan {
    pub truncate_tables: Vec<String>,
    pub delete_keys: Vec<DocumentKey>,
    pub delete_points: Vec<uuid::Uuid>,
    /// Delete markers: vector-less points at chunk 0 of a deleted key that keep its source
    /// position, so an old event replayed after the delete is recognised as stale.
    pub markers: Vec<PayloadWrite>,
    /// Points to embed (`text`) and write.
    pub upserts: Vec<PointWrite>,
    pub payload_updates: Vec<PayloadWrite>,
}

impl WritePlan {
    pub fn is_empty(&self) -> bool {
        self.truncate_tables.is_empty()
            && self.delete_keys.is_empty()
            && self.delete_points.is_empty()
            && self.markers.is_empty()
            && self.upserts.is_empty()
            && self.payload_updates.is_empty()
    }
}

/// What planning decided beyond the writes.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct PlanOutcome {
    pub plan: WritePlan,
    /// Ops dropped because the index holds a newer position for their key (key, origin).
    pub stale: Vec<(DocumentKey, usize)>,
    /// Upserts whose text was unchanged: payload updated, nothing embedded.
    pub unchanged: usize,
    /// Ops that cannot be applied: (origin, reason). Dead-letter these deliveries.
    pub poison: Vec<(usize, String)>,
}

/// Plans the writes of `batch` given the `stored` state of its keys.
pub fn plan(batch: &Coalesced, stored: &HashMap<DocumentKey, StoredState>) -> PlanOutcome {
    let mut out = PlanOutcome {
        plan: WritePlan {
            truncate_tables: batch.truncates.clone(),
            ..WritePlan::default()
        },
        stale: batch.stale.clone(),
        ..PlanOutcome::default()
    };
    for op in &batch.ops {
        // After a truncate in this batch, nothing stored survives for that table.
        let state = stored
            .get(op.key())
            .filter(|_| !batch.truncates.contains(&op.key().table));
        match op {
            Planned::Delete {
                key,
                position,
                origin,
            } => {
                if is_stale(position, state) {
                    out.stale.push((key.clone(), *origin));
                } else {
                    out.plan.delete_keys.push(key.clone());
                    let mut meta = cdc_meta(key, 0, 0, &None, position, None);
                    meta["deleted"] = Value::Bool(true);
                    let payload: Row = [("_cdc".to_string(), meta)].into_iter().collect();
                    out.plan.markers.push(PayloadWrite {
                        id: key.point_id(0),
                        payload,
                    });
                }
            }
            Planned::Upsert {
                doc,
                unavailable,
                position,
                source_ts_ms,
                origin,
            } => {
                if is_stale(position, state) {
                    out.stale.push((doc.key.clone(), *origin));
                    continue;
                }
                // A delete marker only guards the position; the document itself is gone.
                let state = state.filter(|s| !s.deleted);
                let mut fields = doc.fields.clone();
                if let Some(state) = state {
                    for column in unavailable {
                        if let Some(v) = state.fields.get(column) {
                            fields.insert(column.clone(), v.clone());
                        }
                    }
                }
                let meta = |chunk: usize, chunks: usize, hash: &Option<String>| {
                    cdc_meta(&doc.key, chunk, chunks, hash, position, *source_ts_ms)
                };
                match (&doc.text, state) {
                    (None, None) => out.poison.push((
                        *origin,
                        format!(
                            "{}: a text column was not sent (unchanged TOAST value: {}) and the index holds no earlier version to keep",
                            doc.key,
                            unavailable.join(", ")
                        ),
                    )),
                    (None, Some(state)) => {
                        out.unchanged += 1;
                        payload_only(&mut out.plan, doc, &fields, state.chunks, |c| meta(c, state.chunks, &state.hash));
                    }
                    (Some(_), Some(state)) if state.hash == doc.hash && state.chunks == doc.chunks.len() => {
                        out.unchanged += 1;
                        payload_only(&mut out.plan, doc, &fields, state.chunks, |c| meta(c, state.chunks, &doc.hash));
                    }
                    (Some(_), state) => {
                        let n = doc.chunks.len();
                        for (i, text) in doc.chunks.iter().enumerate() {
                            let mut payload = fields.clone();
                            payload.insert("text".into(), Value::String(text.clone()));
                            payload.insert("_cdc".into(), meta(i, n, &doc.hash));
                            out.plan.upserts.push(PointWrite { id: doc.key.point_id(i), text: text.clone(), payload, origin: *origin });
                        }
                        if let Some(state) = state {
                            out.plan.delete_points.extend((n..state.chunks).map(|i| doc.key.point_id(i)));
                        }
                    }
                }
            }
        }
    }
    out
}

fn payload_only(
    plan: &mut WritePlan,
    doc: &Document,
    fields: &Row,
    chunks: usize,
    meta: impl Fn(usize) -> Value,
) {
    for i in 0..chunks {
        let mut payload = fields.clone();
        payload.insert("_cdc".into(), meta(i));
        plan.payload_updates.push(PayloadWrite {
            id: doc.key.point_id(i),
            payload,
        });
    }
}

fn is_stale(position: &Option<SourcePosition>, state: Option<&StoredState>) -> bool {
    match (position, state.and_then(|s| s.position.as_ref())) {
        (Some(p), Some(stored)) => p.is_older_than(stored),
        _ => false,
    }
}

/// The reserved `_cdc` payload object.
pub fn cdc_meta(
    key: &DocumentKey,
    chunk: usize,
    chunks: usize,
    hash: &Option<String>,
    position: &Option<SourcePosition>,
    source_ts_ms: Option<i64>,
) -> Value {
    json!({
        "table": key.table,
        "key": key.key,
        "chunk": chunk,
        "chunks": chunks,
        "hash": hash,
        "position": position,
        "source_ts_ms": source_ts_ms,
    })
}

/// Reads a [`StoredState`] back from a chunk-0 payload.
pub fn stored_state(payload: &Row) -> Option<StoredState> {
    let cdc = payload.get("_cdc")?;
    let fields = payload
        .iter()
        .filter(|(k, _)| k.as_str() != "_cdc" && k.as_str() != "text")
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let deleted = cdc.get("deleted").and_then(Value::as_bool).unwrap_or(false);
    Some(StoredState {
        deleted,
        hash: cdc.get("hash").and_then(Value::as_str).map(str::to_string),
        position: cdc
            .get("position")
            .and_then(|p| serde_json::from_value(p.clone()).ok()),
        chunks: if deleted {
            0
        } else {
            cdc.get("chunks").and_then(Value::as_u64).unwrap_or(1) as usize
        },
        fields,
    })
}

/// Splits consecutive items of the given sizes into ranges of at most `max_items` items and
/// `max_size` in total (an item larger than that goes alone): how the sinks and the HTTP
/// embedder cut a batch into requests.
pub fn split_ranges(
    sizes: &[usize],
    max_items: usize,
    max_size: usize,
) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let (mut start, mut total) = (0, 0);
    for (i, &size) in sizes.iter().enumerate() {
        if i > start && (i - start == max_items || total + size > max_size) {
            out.push(start..i);
            (start, total) = (i, 0);
        }
        total += size;
    }
    if start < sizes.len() {
        out.push(start..sizes.len());
    }
    out
}

#[cfg(test)]
mod tests;
