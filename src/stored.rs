//! What the index stores for a document, point by point, and how it is read back.
//!
//! The stored document *is* the row's state (DESIGN §4): planning a write is a diff between
//! this state and the new row. A document of `n` chunks is `n` points with vectors:
//!
//! | point | payload |
//! |---|---|
//! | chunk 0 — the **commit record** | the row's payload fields, `text` (chunk 0's text), `_cdc`: `{table, key, chunk: 0, chunks: n, hash, position, source_ts_ms, hidden?}` |
//! | chunk `i > 0` | `text`, `_cdc`: `{table, key, chunk: i, chunks: n, hash}` |
//!
//! Row fields live once per document, on chunk 0 (search joins them into hits of other
//! chunks). `_cdc.hidden` keeps the template columns that are not payload fields, so that an
//! update which does not send a TOASTed column can still re-render the text. Chunk 0 is
//! written after every other point of its document: when it says `hash` and `chunks`, those
//! chunks are in the index.
//!
//! Vector-less points (markers) keep positions and state where no document is searchable:
//!
//! | marker | `_cdc` |
//! |---|---|
//! | deleted row (chunk 0's id) | `{table, key, chunk: 0, chunks: 0, deleted: true, position, source_ts_ms, moved_row?}` — `moved_row` when the row moved to a new key (a primary-key change) |
//! | row whose text is empty (chunk 0's id) | the row's payload fields and `{…, chunks: 0, empty: true, hash, position, hidden?}` |
//! | truncated table (key `""`) | `{table, key: "", chunk: 0, chunks: 0, deleted: true, truncated: true, position}` |
//!
//! Counts, fetches and searches leave markers out.

use serde_json::{Value, json};

use crate::mapping::column_of_payload_key;
use crate::model::{DocumentKey, Row, SourcePosition};

/// What kind of point chunk 0 is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoredKind {
    /// A searchable document.
    Document,
    /// A row whose text rendered empty: fields and position, no vector.
    Empty,
    /// A deleted row, or a table's truncate marker.
    Deleted,
}

/// What the index holds for a document (read from its chunk 0).
#[derive(Debug, Clone, PartialEq)]
pub struct StoredState {
    pub kind: StoredKind,
    pub hash: Option<String>,
    pub position: Option<SourcePosition>,
    /// `source.ts_ms` of the change the index holds.
    pub source_ts_ms: Option<i64>,
    /// Points with vectors (0 for markers).
    pub chunks: usize,
    /// The row's kept columns as stored: payload fields (by column name) and `_cdc.hidden`;
    /// for a delete marker of a row that moved to a new key, the row as it was.
    pub values: Row,
    /// Chunk 0's payload exactly as stored.
    pub payload: Row,
}

/// Reads a [`StoredState`] back from a chunk-0 payload.
pub fn stored_state(payload: &Row) -> Option<StoredState> {
    let cdc = payload.get("_cdc")?;
    let flag = |name: &str| cdc.get(name).and_then(Value::as_bool).unwrap_or(false);
    let kind = if flag("deleted") {
        StoredKind::Deleted
    } else if flag("empty") {
        StoredKind::Empty
    } else {
        StoredKind::Document
    };
    let mut values: Row = payload
        .iter()
        .filter_map(|(k, v)| column_of_payload_key(k).map(|c| (c.to_string(), v.clone())))
        .collect();
    for object in ["hidden", "moved_row"] {
        if let Some(Value::Object(extra)) = cdc.get(object) {
            for (k, v) in extra {
                values.insert(k.clone(), v.clone());
            }
        }
    }
    Some(StoredState {
        kind,
        hash: cdc.get("hash").and_then(Value::as_str).map(str::to_string),
        position: cdc
            .get("position")
            .and_then(|p| serde_json::from_value(p.clone()).ok()),
        source_ts_ms: cdc.get("source_ts_ms").and_then(Value::as_i64),
        chunks: match kind {
            StoredKind::Document => cdc.get("chunks").and_then(Value::as_u64).unwrap_or(1) as usize,
            _ => 0,
        },
        values,
        payload: payload.clone(),
    })
}

/// Everything `_cdc` of a chunk-0 point says.
#[derive(Debug, Clone, Copy)]
pub struct CommitMeta<'a> {
    pub key: &'a DocumentKey,
    pub chunks: usize,
    pub hash: Option<&'a str>,
    pub position: Option<&'a SourcePosition>,
    pub source_ts_ms: Option<i64>,
}

impl CommitMeta<'_> {
    fn value(&self) -> Value {
        json!({
            "table": self.key.table,
            "key": self.key.key,
            "chunk": 0,
            "chunks": self.chunks,
            "hash": self.hash,
            "position": self.position,
            "source_ts_ms": self.source_ts_ms,
        })
    }
}

/// Chunk 0 of a document: payload fields, its text, the full `_cdc`.
pub fn commit_payload(meta: CommitMeta<'_>, fields: &Row, hidden: &Row, text: &str) -> Row {
    let mut cdc = meta.value();
    if !hidden.is_empty() {
        cdc["hidden"] = Value::Object(hidden.clone());
    }
    let mut payload = fields.clone();
    payload.insert("text".into(), Value::String(text.to_string()));
    payload.insert("_cdc".into(), cdc);
    payload
}

/// Chunk `chunk > 0` of a document: its text and where it belongs.
pub fn chunk_payload(
    key: &DocumentKey,
    chunk: usize,
    chunks: usize,
    hash: &str,
    text: &str,
) -> Row {
    let cdc = json!({
        "table": key.table,
        "key": key.key,
        "chunk": chunk,
        "chunks": chunks,
        "hash": hash,
    });
    [
        ("text".to_string(), Value::String(text.to_string())),
        ("_cdc".to_string(), cdc),
    ]
    .into_iter()
    .collect()
}

/// The marker of a row whose text is empty: its fields and position, no vector.
pub fn empty_payload(meta: CommitMeta<'_>, fields: &Row, hidden: &Row) -> Row {
    let mut cdc = CommitMeta { chunks: 0, ..meta }.value();
    cdc["empty"] = Value::Bool(true);
    if !hidden.is_empty() {
        cdc["hidden"] = Value::Object(hidden.clone());
    }
    let mut payload = fields.clone();
    payload.insert("_cdc".into(), cdc);
    payload
}

/// The marker of a deleted row. `moved_row`: the row's values, when it moved to a new key.
pub fn deleted_payload(
    key: &DocumentKey,
    position: Option<&SourcePosition>,
    source_ts_ms: Option<i64>,
    moved_row: Option<&Row>,
) -> Row {
    let mut cdc = CommitMeta {
        key,
        chunks: 0,
        hash: None,
        position,
        source_ts_ms,
    }
    .value();
    cdc["deleted"] = Value::Bool(true);
    if let Some(row) = moved_row {
        cdc["moved_row"] = Value::Object(row.clone());
    }
    [("_cdc".to_string(), cdc)].into_iter().collect()
}

/// The truncate marker of `table`: the position of its last truncate.
pub fn truncate_payload(
    table: &str,
    position: Option<&SourcePosition>,
    source_ts_ms: Option<i64>,
) -> Row {
    let key = DocumentKey::table_marker(table);
    let mut payload = deleted_payload(&key, position, source_ts_ms, None);
    if let Some(cdc) = payload.get_mut("_cdc") {
        cdc["truncated"] = Value::Bool(true);
    }
    payload
}

/// The `_cdc.chunk` of a stored payload (0 when absent).
pub fn chunk_of(payload: &Row) -> u64 {
    payload
        .get("_cdc")
        .and_then(|c| c.get("chunk"))
        .and_then(Value::as_u64)
        .unwrap_or(0)
}

/// The document key a stored payload belongs to.
pub fn key_of(payload: &Row) -> Option<DocumentKey> {
    let cdc = payload.get("_cdc")?;
    Some(DocumentKey {
        table: cdc.get("table")?.as_str()?.to_string(),
        key: cdc.get("key")?.as_str()?.to_string(),
    })
}

/// A search hit's payload with its document's row fields joined in from chunk 0 (hits on
/// chunk 0 carry them already).
pub fn join_fields(hit: &mut Row, chunk0: &Row) {
    for (k, v) in chunk0 {
        if k != "text" && k != "_cdc" {
            hit.entry(k.clone()).or_insert_with(|| v.clone());
        }
    }
}

/// What the index will hold for the keys a write touches, once the write is applied: lets
/// the next batch be planned while this one is still being written (the next batch's reads
/// may or may not see it; applying the overlay makes both the same).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Overlay {
    /// Tables the write truncates: what the index held for them is gone.
    truncated: std::collections::HashSet<String>,
    /// Chunk-0 states the write leaves (commit records, markers, table markers); `None`: the
    /// write deletes the document and leaves nothing.
    states: std::collections::HashMap<DocumentKey, Option<StoredState>>,
}

impl Overlay {
    /// Records that `table` is truncated (before the states that follow).
    pub fn truncate(&mut self, table: &str) {
        self.truncated.insert(table.to_string());
        self.states.retain(|k, _| k.table != table);
    }

    /// Records the chunk-0 payload the write leaves at `key`.
    pub fn put(&mut self, payload: &Row) {
        if let (Some(key), Some(state)) = (key_of(payload), stored_state(payload)) {
            self.states.insert(key, Some(state));
        }
    }

    /// Records that the write removes every point of `key`.
    pub fn remove(&mut self, key: &DocumentKey) {
        self.states.insert(key.clone(), None);
    }

    /// `states`, as read from the index for `keys`, as they will be after the write.
    pub fn apply(
        &self,
        keys: &[DocumentKey],
        states: &mut std::collections::HashMap<DocumentKey, StoredState>,
    ) {
        for key in keys {
            match self.states.get(key) {
                Some(Some(state)) => {
                    states.insert(key.clone(), state.clone());
                }
                Some(None) => {
                    states.remove(key);
                }
                None if self.truncated.contains(&key.table) => {
                    states.remove(key);
                }
                None => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::PositionAt;

    fn key() -> DocumentKey {
        DocumentKey {
            table: "public.t".into(),
            key: r#"{"id":1}"#.into(),
        }
    }

    fn row(v: Value) -> Row {
        v.as_object().cloned().unwrap_or_default()
    }

    #[test]
    fn a_commit_record_reads_back_as_the_row_it_stores() {
        let position = SourcePosition {
            connector: "db".into(),
            at: PositionAt::Lsn(7),
        };
        let fields = row(json!({"title": "t", "gone": null, "_col_text": "a text column"}));
        let hidden = row(json!({"secret_body": "b"}));
        let payload = commit_payload(
            CommitMeta {
                key: &key(),
                chunks: 3,
                hash: Some("h"),
                position: Some(&position),
                source_ts_ms: Some(1),
            },
            &fields,
            &hidden,
            "chunk zero",
        );
        let state = stored_state(&payload).expect("state");
        assert_eq!(state.kind, StoredKind::Document);
        assert_eq!(state.chunks, 3);
        assert_eq!(state.hash.as_deref(), Some("h"));
        assert_eq!(state.position, Some(position));
        assert_eq!(
            state.values,
            row(json!({"title": "t", "gone": null, "text": "a text column", "secret_body": "b"}))
        );
    }

    #[test]
    fn markers_read_back_as_markers() {
        let moved = row(json!({"body": "kept"}));
        let state = stored_state(&deleted_payload(&key(), None, None, Some(&moved))).expect("m");
        assert_eq!(state.kind, StoredKind::Deleted);
        assert_eq!(state.chunks, 0);
        assert_eq!(state.values, moved);
        let t = stored_state(&truncate_payload("public.t", None, None)).expect("t");
        assert_eq!(t.kind, StoredKind::Deleted);
        let meta = CommitMeta {
            key: &key(),
            chunks: 9,
            hash: Some("e"),
            position: None,
            source_ts_ms: None,
        };
        let e = stored_state(&empty_payload(meta, &row(json!({"a": 1})), &Row::new())).expect("e");
        assert_eq!((e.kind, e.chunks), (StoredKind::Empty, 0));
    }
}
